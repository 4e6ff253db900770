"""Times `dual_path.evaluation.retrieval_metrics` on a COCO 5K-sized matrix (run by hand).

A random float32 similarity of 5,000 images x 25,000 texts (5 captions per image,
text j belongs to image j // 5) is scored twice: by `retrieval_metrics` and by a
plain per-query argsort reference (VSE++ i2t/t2i with ties placed in favour of the
correct item); the script prints both times and asserts the metrics are identical.

    python -m experiments.benchmarks.retrieval_metrics [--images 5000] [--captions 5]
    python -m experiments.benchmarks.retrieval_metrics \\
        --output_json=experiments/results/benchmarks/retrieval_metrics.json
"""
import argparse
import time

import numpy as np

from dual_path import evaluation
from experiments.benchmarks import report


def argsort_reference(similarity: np.ndarray, image_of_text: np.ndarray) -> dict:
    """VSE++ metrics with one stable argsort per query (correct items first on ties)."""
    num_images, num_texts = similarity.shape
    i2t_ranks = np.empty(num_images, dtype=np.int64)
    for image in range(num_images):
        is_caption = image_of_text == image
        order = np.lexsort((~is_caption, -similarity[image]))
        i2t_ranks[image] = np.flatnonzero(is_caption[order])[0]
    t2i_ranks = np.empty(num_texts, dtype=np.int64)
    for text in range(num_texts):
        is_image = np.arange(num_images) == image_of_text[text]
        order = np.lexsort((~is_image, -similarity[:, text]))
        t2i_ranks[text] = np.flatnonzero(is_image[order])[0]
    metrics = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in (1, 5, 10):
            metrics[f"{direction}_r{k}"] = 100.0 * np.count_nonzero(ranks < k) / len(ranks)
        metrics[f"{direction}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{direction}_meanr"] = float(ranks.mean() + 1)
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--seed", type=int, default=0)
    report.add_output_argument(parser)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    image_of_text = np.repeat(np.arange(args.images), args.captions)
    similarity = rng.standard_normal((args.images, len(image_of_text)), dtype=np.float32)
    # Make the correct pairs score higher so that the recalls are not all near zero.
    similarity[image_of_text, np.arange(len(image_of_text))] += 3.0
    print(f"similarity {similarity.shape} float32, {similarity.nbytes / 2**20:.0f} MiB")

    start = time.perf_counter()
    metrics = evaluation.retrieval_metrics(similarity, image_of_text)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics_1k = evaluation.retrieval_metrics(similarity, image_of_text, folds=5)
    folds_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = argsort_reference(similarity, image_of_text)
    reference_seconds = time.perf_counter() - start

    print(f"retrieval_metrics            {fast_seconds:8.2f} s")
    print(f"retrieval_metrics, 5 folds   {folds_seconds:8.2f} s")
    print(f"per-query argsort reference  {reference_seconds:8.2f} s")
    for name in reference:
        print(f"  {name:10s} {metrics[name]:10.4f} {reference[name]:10.4f}   (5 folds: {metrics_1k[name]:.4f})")
    assert metrics == reference, "retrieval_metrics disagrees with the argsort reference"
    print("identical metrics")

    if args.output_json:
        figures = {
            "retrieval_metrics_seconds": fast_seconds,
            "retrieval_metrics_5_folds_seconds": folds_seconds,
            "argsort_reference_seconds": reference_seconds,
        }
        ratios = {
            "argsort_reference_over_retrieval_metrics": reference_seconds / fast_seconds,
            "retrieval_metrics_5_folds_over_1_fold": folds_seconds / fast_seconds,
        }
        report.write_report(args.output_json, "retrieval_metrics", figures, ratios,
                            {**vars(args), "texts": len(image_of_text)})


if __name__ == "__main__":
    main()
