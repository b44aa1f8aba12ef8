"""How learned SEAL scales relate to head ablation: correlate a `seal-gguf heads` CSV with scales files.

    seal-gguf heads /tmp/w/smol -o heads.csv --plot heads.png --mode exact --length 1024 --samples 2
    python tools/exp_heads.py heads.csv seal_gguf/bundled/smollm2-135m-instruct-seal-h.safetensors \
        seal_gguf/bundled/smollm2-135m-instruct-seal-c.safetensors [--compare heads-512.csv]

For each scales file (SEAL-C: the mean over each head's channels) and each factor in the CSV, prints
Pearson and Spearman correlations between the scale of a head and the change in answer loss and in
accuracy when that head is scaled by the factor, with a two-sided permutation p-value, over all
layers x heads; the same within layers (each layer's mean removed from both), and the mean scale of
the tenth of the heads whose change raises / lowers the metric most. If SEAL learns what ablation shows, heads whose removal raises the loss get
scales > 1: a positive correlation between scale and delta loss when zeroed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from seal_gguf.scales import read_scales

PERMUTATIONS = 10_000


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def permutation_p(stat, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    """Two-sided: the share of shuffles of y whose |statistic| reaches the observed one."""
    observed = abs(stat(x, y))
    hits = sum(abs(stat(x, rng.permutation(y))) >= observed for _ in range(PERMUTATIONS))
    return (hits + 1) / (PERMUTATIONS + 1)


def within_layers(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """values (flattened like grid, [layers, heads]) minus the mean of their layer."""
    v = values.reshape(grid.shape)
    return (v - v.mean(axis=1, keepdims=True)).ravel()


def read_effects(path: Path) -> tuple[dict[float, dict[str, np.ndarray]], dict[str, str]]:
    """{factor: {delta_loss, delta_accuracy: [layers, heads]}} and the baseline of a heads CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if any(not r.get("delta_loss") for r in rows):
        raise SystemExit(f"{path}: not every head was ablated; make the CSV with `seal-gguf heads --mode exact`")
    layers = 1 + max(int(r["layer"]) for r in rows)
    heads = 1 + max(int(r["head"]) for r in rows)
    out: dict[float, dict[str, np.ndarray]] = {}
    for r in rows:
        grids = out.setdefault(float(r["factor"]), {k: np.full((layers, heads), np.nan)
                                                    for k in ("delta_loss", "delta_accuracy")})
        for key, grid in grids.items():
            grid[int(r["layer"]), int(r["head"])] = float(r[key])
    base = {k: rows[0][k] for k in ("base_loss", "base_accuracy", "cases")}
    return out, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heads_csv", type=Path)
    parser.add_argument("scales", type=Path, nargs="+")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    parser.add_argument("--compare", type=Path, default=None, metavar="OTHER_CSV",
                        help="another heads CSV (other length or cases): how well the delta losses agree")
    args = parser.parse_args()
    effects, base = read_effects(args.heads_csv)
    rng = np.random.default_rng(args.seed)
    if args.compare is not None:
        other, _ = read_effects(args.compare)
        for factor in sorted(set(effects) & set(other)):
            x, y = effects[factor]["delta_loss"].ravel(), other[factor]["delta_loss"].ravel()
            print(f"delta loss (factor {factor:g}) vs {args.compare.name}: Spearman {spearman(x, y):+.3f}, "
                  f"Pearson {pearson(x, y):+.3f}")
    print(f"{args.heads_csv}: baseline loss {base['base_loss']}, accuracy {base['base_accuracy']}, "
          f"{base['cases']} cases")
    for factor, grids in sorted(effects.items()):
        dl = grids["delta_loss"]
        print(f"factor {factor:g}: delta loss min {np.nanmin(dl):+.4f} max {np.nanmax(dl):+.4f}; "
              f"{int((dl < 0).sum())} of {dl.size} heads lower the loss")
    for path in args.scales:
        scales = read_scales(path)
        s = scales.per_head().numpy().astype(float).ravel()
        for factor, grids in sorted(effects.items()):
            for key, grid in grids.items():
                y = grid.ravel()
                if np.all(y == y[0]):
                    print(f"{path.name} vs {key} (factor {factor:g}): constant, no correlation")
                    continue
                rho, r = spearman(s, y), pearson(s, y)
                print(f"{path.name} ({scales.granularity}) vs {key} (factor {factor:g}), n={len(s)}: "
                      f"Spearman {rho:+.3f} (p={permutation_p(spearman, s, y, rng):.4f}), "
                      f"Pearson {r:+.3f} (p={permutation_p(pearson, s, y, rng):.4f})")
                # depth alone could link the two (both vary from layer to layer): compare heads of the same layer
                s_in, y_in = within_layers(s, grid), within_layers(y, grid)
                print(f"    within layers (layer means removed): Spearman {spearman(s_in, y_in):+.3f} "
                      f"(p={permutation_p(spearman, s_in, y_in, rng):.4f})")
                order = np.argsort(y)
                tenth = max(1, len(y) // 10)
                print(f"    mean scale of the {tenth} heads whose change raises {key} most: "
                      f"{s[order[-tenth:]].mean():.3f}; lowers it most: {s[order[:tenth]].mean():.3f}")


if __name__ == "__main__":
    main()
