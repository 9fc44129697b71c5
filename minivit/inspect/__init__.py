"""Looking at a ViT without running it, and at what a run left behind.

- `cost`: parameters, tokens, MACs/FLOPs and activation memory from a configuration;
- `plots`: training curves and gradient norms from a run folder's metrics.jsonl;
- `rollout`: class-token attention maps and attention rollout, figures of them (one model, or
  several side by side), and how spread out the maps are.

Pure NumPy and arithmetic; matplotlib is imported only when something is drawn.
"""

from minivit.inspect.cost import CostReport, format_cost, model_cost, parameter_shapes
from minivit.inspect.plots import curves, plot_grads, plot_runs, read_metrics
from minivit.inspect.rollout import (
    attention_map_subject,
    attention_rollout,
    cls_attention_maps,
    map_statistics,
    save_attention_comparison,
    save_attention_figure,
    upsample_nearest,
)

__all__ = [
    "CostReport", "format_cost", "model_cost", "parameter_shapes",
    "curves", "plot_grads", "plot_runs", "read_metrics",
    "attention_map_subject", "attention_rollout", "cls_attention_maps", "map_statistics",
    "save_attention_comparison", "save_attention_figure", "upsample_nearest",
]
