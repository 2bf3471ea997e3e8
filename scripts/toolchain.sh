# Sourced by the scripts that build: rust-toolchain.toml pins the toolchain CI builds with,
# and rustup fetches it where it can. On a machine that has not got it and cannot fetch it
# (offline, or RUSTUP_AUTO_INSTALL=0), build with rustup's default toolchain and say which,
# rather than stop. An explicit RUSTUP_TOOLCHAIN is left alone.
if [ -z "${RUSTUP_TOOLCHAIN:-}" ] && command -v rustup >/dev/null 2>&1; then
  pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
  if [ -n "$pinned" ] && ! rustup run "$pinned" rustc --version >/dev/null 2>&1; then
    fallback=$(rustup default 2>/dev/null | cut -d' ' -f1)
    if [ -n "$fallback" ]; then
      export RUSTUP_TOOLCHAIN="$fallback"
      echo "note: rust-toolchain.toml pins $pinned, which rustup has not got here; building with $(rustc --version)" >&2
    fi
  fi
fi
