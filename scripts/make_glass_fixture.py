#!/usr/bin/env python3
"""Write tests/fixtures/glassllm_logits.json with glassllm's own NumPy forward pass.

The test `glassllm_parity` compares convoy's logits on the converted model against these.
Usage: make_glass_fixture.py PACKAGE_PARENT_DIR OUT_JSON   (PACKAGE_PARENT_DIR holds glassllm/)
"""
import json
import sys

sys.path.insert(0, sys.argv[1])
import numpy as np  # noqa: E402
from glassllm.model import GlassLM  # noqa: E402
from glassllm.tokenizer import Tokenizer  # noqa: E402

pkg = sys.argv[1] + "/glassllm/weights/"
model = GlassLM.load(pkg + "en.npz", dtype=np.float32)
tok = Tokenizer.load(pkg + "en.tokenizer.json")
cases = []
for text in ["Once upon a time, the little fox said", "“Where are you going?” asked Alice.\nThe cat smiled."]:
    ids = tok.encode(text)
    logits = model.forward(np.array(ids)).data[0]
    cases.append({"text": text, "ids": ids, "logits": [[round(float(x), 6) for x in row] for row in logits]})
with open(sys.argv[2], "w") as f:
    json.dump({"source": "glassllm==0.1.0 GlassLM.forward, float32, weights en.npz", "cases": cases}, f)
