//! `convoy-bench calibrate` (being written).

use anyhow::Result;

/// Arguments of `convoy-bench calibrate`.
#[derive(clap::Args)]
pub struct CalibrateArgs {}

/// Run the calibration.
pub fn main(_args: CalibrateArgs) -> Result<()> {
    anyhow::bail!("not built yet")
}
