"""A tiny, randomly initialised open_clip model saved as a real checkpoint file, for tests and CI.

Random weights exercise the mechanics (loading, batching, storage, fusion), not semantics. It is
loaded through the same code path as real weights: ``clip.model`` names the JSON model config,
``clip.pretrained`` the checkpoint file."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_clip(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``mmrag-tiny-clip.json`` and ``mmrag-tiny-clip.pt`` into ``folder``; return both paths."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "mmrag-tiny-clip.json"
    ckpt = folder / "mmrag-tiny-clip.pt"
    if cfg_path.exists() and ckpt.exists():
        return cfg_path, ckpt
    cfg_path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model("mmrag-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt
