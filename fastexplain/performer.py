"""The performer: a frozen CNN whose feature map at a named layer the explainer learns to explain ([EXPL]
arXiv 1805.07468, §3; docs/explainer.md).

A :class:`Performer` wraps any ``nn.Module`` (or a torchvision classification model built by name, random
init unless ``weights=PATH`` names a local state_dict — nothing is ever downloaded). Layers are named by
their dotted ``named_modules`` path. The wrapped model is frozen and stays in eval mode even when a parent
module's ``.train()`` is called.

Features are read with forward hooks. When no head is needed the forward pass stops right after the
highest requested layer (a private exception raised from the hook), so the layers above it cost nothing.

The **head** maps the feature at the target layer to the model's output, so that predictions can be
computed from a reconstruction:

* ``head="auto"`` (default): an explicit head for the architectures whose "rest of the network" is known —
  ``nn.Sequential`` models, VGG/AlexNet-style models (``features`` Sequential → ``avgpool`` → flatten →
  ``classifier``) and torchvision ResNets (a stage ``layerN``, a block ``layerN.i`` or a stem module).
  Its cost is only the layers above the target layer. Anything else: feature-only mode (no head), with a
  warning (once per model class and layer) that says how to get the KL term and prediction agreement.
* ``head="hook"``: works for any model whose forward calls the target layer once and returns logits: the
  whole model is run on the images with a forward hook substituting the target layer's output. Cost: one
  full performer forward per call (the layers below the target are recomputed, without autograd). A target
  module called twice in one forward pass (e.g. one ``nn.ReLU`` shared by several blocks) is an error.
* ``head=None``: feature-only mode.
"""
from __future__ import annotations

import difflib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

HEAD_MODES = ("auto", "hook", None)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WARNED_NO_HEAD: set[tuple[str, str]] = set()
_RESNET_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


class _StopForward(Exception):
    """Raised from a hook once every requested feature has been captured."""


class PerformerFeatures(NamedTuple):
    """The performer's features for a batch of images."""

    input: Tensor            #: x* at the explained layer, [B, C, h, w]
    target: Tensor           #: the feature at the target layer (the input layer by default)
    logits: Tensor | None    #: the performer's output, or None in feature-only mode


@dataclass(frozen=True)
class PerformerSpec:
    """How to rebuild a torchvision performer; stored in checkpoints (None for a user module)."""

    model: str
    layer: str
    target_layer: str
    weights: str | None
    num_classes: int
    head: str | None
    init_seed: int = 0  # seeds the random initialisation when there are no weights, so rebuilds match


def _closest_names(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.3) or valid[:5]
    return ", ".join(repr(n) for n in close)


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; an unknown name lists the closest valid ones."""
    modules = dict(model.named_modules())
    if not isinstance(name, str) or not name or name not in modules:
        valid = [n for n in modules if n]
        raise ValueError(f"unknown layer {name!r}; closest valid names: {_closest_names(str(name), valid)} "
                         f"(see [n for n, _ in model.named_modules()])")
    return modules[name]


def _sequential_head(model: nn.Module, layer: str) -> nn.Module | None:
    """The rest of the network after ``layer`` for Sequential, VGG/AlexNet-style and ResNet models."""
    parts = layer.split(".")
    if isinstance(model, nn.Sequential) and len(parts) == 1:
        names = [n for n, _ in model.named_children()]
        return nn.Sequential(*list(model)[names.index(parts[0]) + 1:])
    if (isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "avgpool")
            and isinstance(getattr(model, "classifier", None), nn.Module)):
        if layer == "features":
            rest: list[nn.Module] = []
        elif parts[0] == "features" and len(parts) == 2 and parts[1].isdigit():
            rest = list(model.features)[int(parts[1]) + 1:]
        else:
            return None
        return nn.Sequential(*rest, model.avgpool, nn.Flatten(1), model.classifier)
    if all(hasattr(model, n) for n in _RESNET_ORDER):
        stage = parts[0]
        if stage not in _RESNET_ORDER or stage == "fc" or len(parts) > 2:
            return None
        rest = []
        if len(parts) == 2:
            blocks = getattr(model, stage)
            if not isinstance(blocks, nn.Sequential) or not parts[1].isdigit():
                return None
            rest.extend(list(blocks)[int(parts[1]) + 1:])
        following = _RESNET_ORDER[_RESNET_ORDER.index(stage) + 1:]
        for n in following:
            rest.append(getattr(model, n))
            if n == "avgpool":
                rest.append(nn.Flatten(1))
        return nn.Sequential(*rest)
    return None


class Performer(nn.Module):
    """A frozen CNN with an explained layer, a target layer and (where possible) a head ([EXPL] §3).

    The wrapped model is frozen (``requires_grad`` False) and stays in eval mode even when a parent's
    ``.train()`` is called. ``features(images)`` reads x* (and the target feature) with forward hooks; without
    a head the forward pass stops right after the highest requested layer.

    Args:
        model: the CNN. Layers are named by their dotted ``named_modules`` path (``features.29``, ``layer4``).
        layer: dotted path of the explained layer (its output is x*).
        target_layer: dotted path of the layer whose output the explainer reconstructs (default: ``layer``).
        head: how predictions are computed from a (reconstructed) target feature, needed for the KL term
            and the prediction agreement:

            * ``"auto"`` (default): an explicit head for ``nn.Sequential`` models, VGG/AlexNet-style models
              (``features`` → ``avgpool`` → flatten → ``classifier``) and torchvision ResNets; it costs only
              the layers above the target. Another model gets no head (feature-only mode) and a warning.
            * ``"hook"``: any model whose forward calls the target layer exactly once and returns logits;
              the whole model reruns with the target layer's output substituted (one full forward per
              call). A target layer called twice in one forward raises a ValueError.
            * ``None``: feature-only mode (no KL term, no agreement).
        mean, std: per-channel input normalisation applied to images in [0, 1] (None: images used as given).
        spec: how to rebuild this performer (set by :meth:`from_torchvision`; checkpoints store it).
    """

    def __init__(self, model: nn.Module, layer: str, target_layer: str | None = None, *,
                 head: str | None = "auto", mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, spec: PerformerSpec | None = None) -> None:
        super().__init__()
        if head not in HEAD_MODES:
            raise ValueError(f"Performer: head must be one of {HEAD_MODES}, got {head!r}")
        self.model = model
        self.layer = layer
        self.target_layer = target_layer if target_layer is not None else layer
        self._layer_module = resolve_layer(model, self.layer)
        self._target_module = resolve_layer(model, self.target_layer)
        model.requires_grad_(False)
        model.eval()
        self.head_mode = head
        self.head: nn.Module | None = _sequential_head(model, self.target_layer) if head == "auto" else None
        if head == "auto" and self.head is None:
            _warn_no_head(model, self.target_layer)
        self.spec = spec
        if (mean is None) != (std is None):
            raise ValueError("Performer: give both mean and std for input normalisation, or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_torchvision(cls, name: str, layer: str, target_layer: str | None = None, *,
                         weights: str | Path | None = None, num_classes: int | None = None,
                         head: str | None = "auto", init_seed: int = 0) -> "Performer":
        """A torchvision classification model by name: random init seeded by ``init_seed`` (so that a
        checkpoint rebuilds the same performer), or ``weights``, a local state_dict file. ``num_classes``
        None: the classifier width of ``weights`` (e.g. 200 for a CUB model), 1000 without weights."""
        import torchvision

        available = sorted(torchvision.models.list_models(module=torchvision.models))
        if name not in available:
            raise ValueError(f"unknown torchvision classification model {name!r}; closest: "
                             f"{_closest_names(name, available)}")

        def build(classes: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                return torchvision.models.get_model(name, weights=None, num_classes=classes)

        state = None if weights is None else load_state_dict_file(weights)
        model = build(1000 if num_classes is None else num_classes)
        if state is not None and num_classes is None:
            width = classifier_width(model, state)
            if width is not None and width != 1000:
                model = build(width)
        num_classes = _classifier_out(model)[1] if num_classes is None else num_classes
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError as error:
                detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
                raise ValueError(f"weights {str(weights)!r} do not fit torchvision {name} with {num_classes} classes: "
                                 f"{detail}") from None
        spec = PerformerSpec(model=name, layer=layer, target_layer=target_layer or layer,
                             weights=None if weights is None else str(Path(weights).resolve()),
                             num_classes=num_classes, head=head, init_seed=init_seed)
        return cls(model, layer, target_layer, head=head, mean=IMAGENET_MEAN, std=IMAGENET_STD, spec=spec)

    @classmethod
    def from_spec(cls, spec: PerformerSpec | dict[str, Any]) -> "Performer":
        """Rebuild a performer recorded with :meth:`from_torchvision` (e.g. from a checkpoint)."""
        spec = spec if isinstance(spec, PerformerSpec) else PerformerSpec(**spec)
        return cls.from_torchvision(spec.model, spec.layer, spec.target_layer, weights=spec.weights,
                                    num_classes=spec.num_classes, head=spec.head, init_seed=spec.init_seed)

    def train(self, mode: bool = True) -> "Performer":
        """The performer stays in eval mode whatever ``mode`` is (it is frozen)."""
        super().train(False)
        return self

    @property
    def has_head(self) -> bool:
        return self.head is not None or self.head_mode == "hook"

    def normalise(self, images: Tensor) -> Tensor:
        if self.mean is None:
            return images
        return (images - self.mean.to(images)) / self.std.to(images)

    @torch.no_grad()
    def features(self, images: Tensor, *, with_logits: bool = True) -> PerformerFeatures:
        """x*, the target feature and (when a head exists and ``with_logits``) the performer's output."""
        captured: dict[str, Tensor] = {}
        want_logits = with_logits and self.has_head
        wanted = {self.layer, self.target_layer}

        def capture(name: str) -> Callable:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if not isinstance(output, Tensor) or output.dim() != 4:
                    raise ValueError(f"layer {name!r} returns {type(output).__name__} "
                                     f"{tuple(getattr(output, 'shape', ()))}, not a [B, C, H, W] feature map; "
                                     f"pick a convolutional layer")
                if name in captured and want_logits and self.head_mode == "hook" and name == self.target_layer:
                    raise _called_twice(self.target_layer)
                captured.setdefault(name, output.detach())
                if not want_logits and wanted <= captured.keys():
                    raise _StopForward
            return hook

        handles = [self._layer_module.register_forward_hook(capture(self.layer))]
        if self.target_layer != self.layer:
            handles.append(self._target_module.register_forward_hook(capture(self.target_layer)))
        logits = None
        try:
            output = self.model(self.normalise(images))
            if want_logits and self.head_mode == "hook":
                logits = output
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = wanted - captured.keys()
        if missing:
            raise ValueError(f"layer(s) {sorted(missing)} were not called in the model's forward pass")
        if want_logits and self.head is not None:
            logits = self.head(captured[self.target_layer])
        return PerformerFeatures(captured[self.layer], captured[self.target_layer], logits)

    def run_head(self, target_feature: Tensor, images: Tensor | None = None) -> Tensor:
        """The performer's output computed from a (reconstructed) target feature; differentiable in it.

        ``images`` is needed only in ``head="hook"`` mode, where the whole model runs with the target
        layer's output replaced by ``target_feature``.
        """
        if self.head is not None:
            return self.head(target_feature)
        if self.head_mode != "hook":
            raise RuntimeError("this performer has no head (feature-only mode); use head='hook' or a "
                               "Sequential/VGG/AlexNet/ResNet model")
        if images is None:
            raise ValueError("run_head: head='hook' needs the images the target feature was computed from")

        calls = []

        def substitute(module: nn.Module, args: Any, output: Any) -> Tensor:
            calls.append(1)
            if len(calls) > 1:
                raise _called_twice(self.target_layer)
            return target_feature.to(output.dtype) if isinstance(output, Tensor) else output

        handle = self._target_module.register_forward_hook(substitute)
        try:
            return self.model(self.normalise(images))
        finally:
            handle.remove()

    @torch.no_grad()
    def probe(self, image_size: int | tuple[int, int], channels: int = 3) -> tuple[torch.Size, torch.Size]:
        """Shapes (C, h, w) of x* and of the target feature for images of ``image_size``."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        feats = self.features(torch.zeros(1, channels, *size, device=device), with_logits=False)
        return feats.input.shape[1:], feats.target.shape[1:]

    def forward(self, images: Tensor) -> PerformerFeatures:
        return self.features(images)


def _warn_no_head(model: nn.Module, target_layer: str) -> None:
    """Warn once per (model class, layer) that head="auto" fell back to feature-only mode, and say what to do."""
    key = (type(model).__name__, target_layer)
    if key in _WARNED_NO_HEAD:
        return
    _WARNED_NO_HEAD.add(key)
    warnings.warn(f"Performer: head='auto' does not know the layers after {target_layer!r} in a "
                  f"{type(model).__name__} (it knows nn.Sequential, VGG/AlexNet-style and ResNet models), so the "
                  f"explainer runs in feature-only mode: no KL term, no prediction agreement. Pass head='hook' "
                  f"if the model's forward calls {target_layer!r} once and returns logits, or head=None to "
                  f"silence this warning", UserWarning, stacklevel=3)


def _called_twice(layer: str) -> ValueError:
    return ValueError(f"head='hook' cannot substitute layer {layer!r}: it is called more than once in one forward "
                      f"pass (e.g. an nn.ReLU shared by several blocks), so the logits would be wrong; explain a "
                      f"layer that is called once, or use head='auto' or head=None")


def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the model's state_dict (names, dtypes, shapes and bytes): equal iff the weights are."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def performer_identity(performer: "Performer", image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint's: model class, layers, head mode, weights (and,
    when given, the image size the performer reads)."""
    identity: dict[str, Any] = {"model": type(performer.model).__name__, "layer": performer.layer,
                                "target_layer": performer.target_layer, "head": performer.head_mode,
                                "weights_sha256": weights_fingerprint(performer.model)}
    if image_size is not None:
        identity["image_size"] = [int(n) for n in image_size]
    return identity


def check_same_performer(saved: dict[str, Any] | None, current: dict[str, Any], action: str = "resume") -> None:
    """Refuse to ``action`` (resume, explain, …) with another performer than the checkpoint's, naming what
    differs (a checkpoint without a record passes)."""
    if not saved:
        return
    changed = [key for key in current if key in saved and saved[key] != current[key]]
    if not changed:
        return
    details = ", ".join("weights (their SHA-256 differs)" if key == "weights_sha256"
                        else f"{key}: {saved[key]!r} → {current[key]!r}" for key in changed)
    subject = "image size" if changed == ["image_size"] else "performer"
    fix = f"{subject} or a new output directory" if action == "resume" else f"{subject} the explainer was trained on"
    what = f"the {subject} differs"
    raise ValueError(f"cannot {action}: {what} from the checkpoint's ({details}); use the same {fix}")


def _classifier_out(model: nn.Module) -> tuple[str, int]:
    """(name, width) of the model's classifier: its last Linear module (its last Conv2d, as in SqueezeNet,
    when it has none)."""
    linears = [(name, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [(name, m.out_channels) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return (linears or convs or [("", 1000)])[-1]


def classifier_width(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """The number of classes ``state`` was trained for: the first dimension of its weight for the model's
    classifier (None when the state_dict has no such entry)."""
    name, _ = _classifier_out(model)
    weight = state.get(f"{name}.weight")
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() >= 1 else None


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A local state_dict file (weights only); a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass the path of a local state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a state_dict"
        raise ValueError(f"{str(path)!r} is not a readable state_dict file ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state_dict")
    return state
