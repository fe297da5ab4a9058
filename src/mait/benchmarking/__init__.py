"""Throughput and memory measurements of whole models and of the attention op (the library behind ``mait bench``).

* :mod:`.measure`: :class:`BenchSettings` (what to measure), timed calls, peak extra memory,
  the environment a figure was measured in, result files (JSON, CSV, PNG);
* :mod:`.models`: whole models, inference or training steps, in interleaved rounds;
* :mod:`.attention_op`: the masked-attention op alone over grid sizes, every backend.

    from mait.benchmarking import BenchSettings, bench_models, models_table
    result = bench_models(["mait_t24_224", "deit_tiny_patch16_224"], BenchSettings(batch_size=16), torch.device("cpu"))
    print(models_table(result, torch.device("cpu")))
"""

from .attention_op import attention_header, bench_attention, plot_attention
from .measure import BenchSettings, environment, parse_spec, peak_extra_memory, timed, where, write_results
from .models import bench_models, models_table, plot_models

__all__ = [
    "BenchSettings", "attention_header", "bench_attention", "bench_models", "environment", "models_table",
    "parse_spec", "peak_extra_memory", "plot_attention", "plot_models", "timed", "where", "write_results",
]
