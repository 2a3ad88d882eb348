"""ScLabel-Net: a single-device torch transformer over gene tokens with expression values."""

from sclabel_dist.model.args import FLAVOURS, ModelArgs, build_model_args, count_params, flops_per_token

__all__ = ["FLAVOURS", "ModelArgs", "build_model_args", "count_params", "flops_per_token"]
# ScLabelNet, ModelOutput and mlm_loss live in sclabel_dist.model.net (imports torch).
