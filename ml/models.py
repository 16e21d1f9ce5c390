"""Model registry: small_cnn, mlp and torchvision classifiers (random init, never hub weights).

``build_model(cfg, num_classes, in_channels)`` returns a plain ``nn.Module`` whose state_dict keys
are the architecture's own (a torchvision model's weights load into the same torchvision model
built by hand with the same first-conv/head adaptations).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from configs.schema import CUSTOM_MODELS, TORCHVISION_MODELS, ModelConfig

log = logging.getLogger("kiln.ml")


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv stages (w, 2w, 4w channels) + global pooling: ~98-99% on digits in seconds."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.0, width: int = 24):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Sequential(_conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2)),      # [N,w,H/2,W/2]
            nn.Sequential(_conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2)),   # [N,2w,H/4,W/4]
            nn.Sequential(_conv_bn(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1)),               # [N,4w,1,1]
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Pools any input to 16x16 first, so one model works for every image_size."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.0, hidden: int = 512):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(16)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 256, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden // 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pool(x))


def _torchvision_model(name: str, num_classes: int, dropout: float) -> nn.Module:
    import torchvision

    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)  # aux heads return tuples in train mode
    try:
        return torchvision.models.get_model(name, dropout=dropout, **kwargs)
    except TypeError:  # architecture without a dropout argument: add it in front of the head
        model = torchvision.models.get_model(name, **kwargs)
    if dropout > 0:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        # A pre-hook keeps the state_dict keys identical to the plain torchvision model.
        head.register_forward_pre_hook(
            lambda mod, args: (nn.functional.dropout(args[0], dropout, mod.training),))
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the stem conv (the first Conv2d registered) so it takes ``in_channels`` inputs."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        child.dilation, child.groups, child.bias is not None, child.padding_mode))
                return
    raise ValueError("model has no Conv2d stem to adapt to in_channels")  # pragma: no cover


def _checkpoint_targets(model: nn.Module) -> list[nn.Module]:
    """The blocks to recompute in backward: residual stages, encoder layers or feature stages."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):            # resnet / resnext / wide
        return [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):   # vit
        return list(model.encoder.layers)
    for attr in ("features", "trunk_output", "layers"):                  # most CNNs, regnet, mnasnet
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential):
            return [m for m in seq if any(True for _ in m.parameters())]
    if hasattr(model, "stage2"):                                         # shufflenet
        return [model.stage2, model.stage3, model.stage4]
    return [m for n, m in model.named_children() if n.startswith("inception")]  # googlenet


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recompute the activations of each target block in backward; returns how many blocks."""
    targets = _checkpoint_targets(model)
    for block in targets:
        _wrap_forward(block)
    return len(targets)


def _wrap_forward(block: nn.Module) -> None:
    inner = block.forward
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextlib.contextmanager
    def frozen_norm_stats():
        # The recomputation must not update BatchNorm running stats a second time.
        saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                 for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    def forward(*args):
        if block.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), frozen_norm_stats()))
        return inner(*args)

    block.forward = forward


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load a local state_dict (or Kiln checkpoint) with weights_only=True; mismatched shapes are skipped.

    Errors name the path and never quote the file: what torch.load says about a file that is not a
    state_dict can hold its bytes.
    """
    if not os.path.exists(path):
        raise ValueError(f"model.weights: {path} does not exist; give a local state_dict file")
    if not os.path.isfile(path):  # a FIFO or a device would block or stream forever
        raise ValueError(f"model.weights: {path} is not a regular file; give a local state_dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"model.weights: {path} is not a state_dict saved with torch.save") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"model.weights: {path} does not hold a state_dict (a mapping of names to tensors)")
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if isinstance(v, torch.Tensor) and k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"model.weights: no tensor in {path} matches the model; is it for another architecture?")
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (kept init for %d: %s)", len(usable), path, len(skipped),
             ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, *, grad_checkpointing: bool = False,
                image_size: int | None = None) -> nn.Module:
    """Build ``cfg.name`` for ``num_classes`` outputs on ``in_channels`` (1 or 3) input channels.

    ``image_size`` is only needed by vit_* (fixed positional embedding; default 224).
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    name = cfg.name
    if name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes, in_channels, cfg.dropout)
    elif name == "mlp":
        model = MLP(num_classes, in_channels, cfg.dropout)
    elif name in TORCHVISION_MODELS:
        if name.startswith("vit_") and image_size:
            import torchvision
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                 dropout=cfg.dropout, image_size=image_size)
        else:
            model = _torchvision_model(name, num_classes, cfg.dropout)
        _adapt_first_conv(model, in_channels)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(CUSTOM_MODELS + TORCHVISION_MODELS)}")
    if cfg.weights:
        load_initial_weights(model, cfg.weights)
    if grad_checkpointing:
        n = enable_grad_checkpointing(model)
        if n == 0:
            log.warning("grad_checkpointing: %s has no blocks to checkpoint; training without it", name)
    return model
