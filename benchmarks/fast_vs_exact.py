"""Fast (DCT-scaled) vs exact decode: pixels for every profile, tags on the demo model.

    python benchmarks/fast_vs_exact.py [--images 120]

Inputs are large JPEGs made from the real photos scikit-image and scikit-learn ship
(scaled up, cropped to varied aspect ratios, with grain; tests/sample_photos.py).
Issue 3's bar: the emitted tag sets agree on >= 99% of images and the mean |delta
probability| <= 0.01, at the default draft ratio 2. Ratio 1 (fastest) is reported too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.demo.model import write_demo_bundle
from pipeline.image.imaging import DecodeOptions, decode_image, open_image
from pipeline.image.phash import hamming
from pipeline.model.postprocess import probabilities
from pipeline.model.profiles import load_profile, shipped_profile_names
from pipeline.model.runtime import ProviderChoice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import large_variants  # noqa: E402

from pipeline.model.tagger import TaggerSettings, TaggerStage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--ratios", default="2,1", help="draft ratios to compare, e.g. 2,1.5,1")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    jpegs = large_variants(args.images, seed=11)
    exact_options = DecodeOptions(exact=True)
    print(
        f"{len(jpegs)} JPEGs, long side 2200-4200 px, "
        f"from {len({n.rsplit('-', 1)[0] for n, _ in jpegs})} photos"
    )

    print("\npixels, fast vs exact (0-255 levels)")
    print(
        f"{'profile':<14} {'ratio':>5} {'drafted':>8} {'mean |d|':>9} {'p99 |d|':>8} {'phash max bits':>15}"
    )
    for name in shipped_profile_names():
        pre = load_profile(name).preprocess
        exact = [decode_image(d, pre, exact_options) for _, d in jpegs]
        for ratio in ratios:
            options = DecodeOptions(draft_ratio=ratio)
            fast = [decode_image(d, pre, options) for _, d in jpegs]
            drafted = sum(
                max(open_image(d, options, pre)[0].size) < max(e.width, e.height)
                for (_, d), e in zip(jpegs, exact)
            )
            diffs = np.concatenate(
                [
                    np.abs(f.pixels.astype(np.int16) - e.pixels.astype(np.int16)).ravel()
                    for f, e in zip(fast, exact)
                ]
            )
            bits = max(hamming(f.phash, e.phash) for f, e in zip(fast, exact))
            print(
                f"{name:<14} {ratio:>5g} {drafted:>4}/{len(jpegs):<3} {diffs.mean():>9.3f} "
                f"{np.percentile(diffs, 99):>8.0f} {bits:>15}"
            )

    with tempfile.TemporaryDirectory() as tmp:
        stage = TaggerStage(TaggerSettings(str(write_demo_bundle(tmp)), provider=ProviderChoice.CPU))
        pre = stage.bundle.profile.preprocess
        activation = stage.bundle.profile.activation

        def tag(options: DecodeOptions):
            pixels = np.stack([decode_image(d, pre, options).pixels for _, d in jpegs])
            raw, emb, _ = stage.infer(pixels)
            return probabilities(raw, activation), [set(t) for t in stage.postprocess(raw, emb)["tags"]]

        p_exact, t_exact = tag(exact_options)
        print(f"\ndemo model ({stage.bundle.profile.name} preprocessing), fast vs exact")
        print(
            f"{'ratio':>5} {'same tag set':>13} {'mean |dp| emitted':>18} "
            f"{'mean |dp| all':>14} {'max |dp|':>9}"
        )
        for ratio in ratios:
            p_fast, t_fast = tag(DecodeOptions(draft_ratio=ratio))
            same = np.mean([a == b for a, b in zip(t_fast, t_exact)])
            relevant = (p_fast >= 0.05) | (p_exact >= 0.05)
            delta = np.abs(p_fast - p_exact)
            verdict = "ok" if same >= 0.99 and delta[relevant].mean() <= 0.01 else "BELOW TARGET"
            print(
                f"{ratio:>5g} {same:>12.1%} {delta[relevant].mean():>18.4f} {delta.mean():>14.5f} "
                f"{delta.max():>9.4f}  {verdict}"
            )


if __name__ == "__main__":
    main()
