"""Fuzz the checkpoint folder loader: config.json, model.safetensors and (opted-in) weights-only
pickles. The first byte picks which file of a valid micro checkpoint the rest of the input replaces.

    python fuzz/fuzz_checkpoint.py -max_total_time=3600      (see SECURITY.md)
"""

from __future__ import annotations

import io
import json

from _driver import instrumented, main, micro_config, scratch

with instrumented("mobilevlm.checkpoint", "mobilevlm.config"):
    import torch

    from mobilevlm.checkpoint import FORMAT, FORMAT_VERSION, load_config, load_model

FOLDER = scratch()
CONFIG = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": micro_config().to_dict()}
FILES = ("config.json", "model.safetensors", "model.pt")


def valid_weights() -> dict[str, torch.Tensor]:
    from mobilevlm.model import MobileVLM

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in MobileVLM(micro_config()).state_dict().items()}


def target(data: bytes) -> None:
    if not data:
        return
    which, body = FILES[data[0] % len(FILES)], data[1:]
    for name in FILES:
        (FOLDER / name).unlink(missing_ok=True)
    (FOLDER / "config.json").write_text(json.dumps(CONFIG))
    (FOLDER / which).write_bytes(body)
    if which == "config.json":
        load_config(FOLDER)
    else:
        load_model(FOLDER, allow_pickle=True)


def seeds() -> list[bytes]:
    from safetensors.torch import save

    weights = valid_weights()
    small = {k: weights[k] for k in list(weights)[:3]}
    pickled = io.BytesIO()
    torch.save(small, pickled)
    return [b"\x00" + json.dumps(CONFIG).encode(), b"\x01" + save(weights), b"\x01" + save(small), b"\x02" + pickled.getvalue()]


if __name__ == "__main__":
    main(target, seeds)
