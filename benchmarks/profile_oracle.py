"""How far imported profiles are from timm's and Hugging Face's own pixels, per recipe.

    python benchmarks/profile_oracle.py

For every recipe of tests/model/test_profile_oracle.py (timm pretrained_cfgs and Hugging Face
processor configs) and every photo there (aspect ratios 1:3 to 3:1, odd sizes), the
worst difference in 0-255 levels between tagpipe's exact path (both normalisation
paths) and each oracle: the libraries themselves where installed (timm needs torch and
torchvision), and the independent implementation written in the test. The test asserts
<= 1 level; this prints the figures recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_profile_oracle as t

from pipeline.model.profile_import import profile_data
from pipeline.model.profiles import profile_from_data


def _worst(kind: str, name: str, cfg: dict, oracle) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "timm":
            folder = t._bundle(
                Path(tmp), "config.json", {"pretrained_cfg": cfg}, tuple(cfg["input_size"][1:])
            )
            profile = profile_from_data(profile_data(folder, activation="softmax"), name)
            mean, std = cfg.get("mean", t.IMAGENET_MEAN), cfg.get("std", t.IMAGENET_STD)
        else:
            size = cfg.get("crop_size") or (cfg["size"] if "height" in cfg["size"] else None)
            size_hw = (size["height"], size["width"]) if size else (cfg["size"]["shortest_edge"],) * 2
            folder = t._bundle(Path(tmp), "preprocessor_config.json", cfg, size_hw)
            profile = profile_from_data(profile_data(folder), name)
            mean, std = cfg["image_mean"], cfg["image_std"]
        return max(t._compare(folder, profile, oracle, cfg, mean, std).values())


def main() -> None:
    have_timm = importlib.util.find_spec("timm") is not None
    have_hf = importlib.util.find_spec("transformers") is not None
    print(
        f"{len(t.PHOTOS)} photos; timm {'installed' if have_timm else 'absent'}, "
        f"transformers {'installed' if have_hf else 'absent'}; worst |difference| in levels"
    )
    print(f"{'recipe':28s} {'library':>9s} {'reference':>10s}")
    for kind, configs, library, reference in (
        ("timm", t.TIMM_CONFIGS, t.library_timm if have_timm else None, t.reference_timm),
        ("hf", t.HF_CONFIGS, t.library_hf if have_hf else None, t.reference_hf),
    ):
        for name, cfg in configs.items():
            lib = f"{_worst(kind, name, cfg, library):9.3f}" if library else f"{'-':>9s}"
            print(f"{kind + ' ' + name:28s} {lib} {_worst(kind, name, cfg, reference):10.3f}")


if __name__ == "__main__":
    main()
