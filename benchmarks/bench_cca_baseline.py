"""SDML against a linear baseline: CCA (scikit-learn) fitted on each pair of modalities.

Run: .venv/bin/python benchmarks/bench_cca_baseline.py BUNDLE [--components 10]

For every unordered pair (a, b) a CCA is fitted on the paired training rows of a and b (the
embedded digits' views are paired by sample; SDML itself never uses the pairing), both test
splits are projected into its shared space, and mAP@all is scored both ways with the same
metric as the bundle (cosine, sdml_ext.eval.metrics). Prints the CCA table, the bundle's table and
both averages over the ordered pairs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.cross_decomposition import CCA

import sdml_ext
from sdml_ext.data import load_dataset
from sdml_ext.eval.evaluation import encode_split, evaluate
from sdml_ext.eval.metrics import CrossModalMAP, mean_average_precision


def cca_table(dataset, names, components: int) -> CrossModalMAP:
    m = len(names)
    table = torch.full((m, m), float("nan"), dtype=torch.float64)
    for a in range(m):
        for b in range(a + 1, m):
            A, B = dataset[names[a]], dataset[names[b]]
            if A.train.n != B.train.n or not np.array_equal(A.train.labels, B.train.labels):
                raise SystemExit(f"CCA needs paired rows: {names[a]} and {names[b]} are not paired")
            k = min(components, A.dim, B.dim)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NIPALS convergence warnings on tiny views
                cca = CCA(n_components=k, max_iter=1000).fit(A.train.features, B.train.features)
                qa, qb = cca.transform(A.test.features, B.test.features)
            qa, qb = torch.from_numpy(np.ascontiguousarray(qa, np.float32)), torch.from_numpy(np.ascontiguousarray(qb, np.float32))
            la, lb = torch.from_numpy(A.test.labels), torch.from_numpy(B.test.labels)
            table[a, b] = mean_average_precision(qa, qb, la, lb)
            table[b, a] = mean_average_precision(qb, qa, lb, la)
    average = float(table[~torch.eye(m, dtype=torch.bool)].mean())
    return CrossModalMAP(table, average, list(names))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--components", type=int, default=10, help="CCA components (capped by each pair's smaller width)")
    args = p.parse_args()
    bundle = sdml_ext.load(args.bundle)
    config = bundle.config
    dataset = load_dataset(config.get("dataset", "mfeat"), config.get("data"), **config.get("dataset_options", {}))
    encoded = encode_split(bundle, dataset, "test")
    start = time.perf_counter()
    cca = cca_table(dataset, encoded.names, args.components)
    print(f"CCA baseline ({args.components} components, fitted per pair in {time.perf_counter() - start:.1f} s)")
    print(cca.format())
    sdml = evaluate(encoded).map_all
    print(f"\nSDML bundle {args.bundle}")
    print(sdml.format())
    print(f"\nmAP@all average over {len(encoded.names) * (len(encoded.names) - 1)} ordered pairs: "
          f"SDML {sdml.average:.3f} vs CCA {cca.average:.3f}")


if __name__ == "__main__":
    main()
