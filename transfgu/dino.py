"""Self-supervised DINO pretraining of the ViT backbone (Caron et al., *Emerging Properties in
Self-Supervised Vision Transformers*, ICCV 2021).

A student network (backbone + projection head) sees 2 global and `n_local` local crops of every image; a
teacher network with the same architecture sees the 2 global crops only. The student is trained to predict
the teacher's sharpened, centred softmax output of the *other* views; the teacher is an exponential moving
average (EMA) of the student and receives no gradients.

Library only: every function takes typed arguments (no file paths besides `save_dino_checkpoint`, no
params.yaml). `transfgu/pretrain.py` (`transfgu pretrain`) is the command that trains on a folder of images.

Reading order: `DINOHead` -> `MultiCrop` -> `DINOLoss` -> `cosine_schedule` -> `DINOTrainer` ->
`save_dino_checkpoint`.

Known differences from the official code (facebookresearch/dino), all deliberate:
- one process only (no DistributedDataParallel, so the centre is the mean of this process' batch);
- no stochastic depth in the student (`DinoViT` builds its ViT with drop_path_rate 0);
- the augmentation runs batched on tensors (on the GPU when the images are there): crops are resampled with
  `roi_align` instead of PIL, colour jitter applies its four factors in a fixed order, the Gaussian blur is
  a 3x3 kernel with sigma in [0.1, 2.0] (PIL's blur grows its kernel with the radius);
- `lr` is the peak learning rate as given (the official code multiplies it by batch_size / 256).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from .augment import color_jitter, gaussian_blur3, grayscale
from .devices import to_device
from .io import atomic_output
from .models.vit import DinoViT
from .optim import clip_each_, decay_groups
from .progress import progress as show_progress


# -- projection head --------------------------------------------------------------------------------
class NormedLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, weight = g * v / ||v|| (row-wise), and the gain g
    fixed to 1 (DINO's `weight_norm(nn.Linear(...))` with `weight_g.requires_grad = False`). The state dict
    keys are the official ones: `weight_g` (out, 1) and `weight_v` (out, in)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=False)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (nlayers linear layers, GELU between) -> L2-normalised bottleneck -> weight-normalised last layer.

    The last layer's parameters are named `last_layer.*`: the trainer freezes them in the first epoch."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden: int = 2048, bottleneck: int = 256,
                 nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormedLinear(bottleneck, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


# -- multi-crop augmentation ------------------------------------------------------------------------
def random_resized_boxes(n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """(n, 4) boxes x0, y0, x1, y1 in pixels, as torchvision's RandomResizedCrop draws them: an area fraction
    uniform in `scale`, a log-uniform aspect ratio in `ratio`, the first of `attempts` draws that fits in the
    image, else the whole image. Boxes are not rounded to whole pixels (roi_align samples sub-pixel)."""
    u = torch.rand(n, attempts, 4, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    w = torch.sqrt(area * torch.exp(log_r))
    h = torch.sqrt(area / torch.exp(log_r))
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.int64).argmax(1)  # index of the first draw that fits (0 when none does)
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    x0 = (width - w) * u[rows, first, 2]
    y0 = (height - h) * u[rows, first, 3]
    none = ~fits.any(1)
    w, h = torch.where(none, float(width), w), torch.where(none, float(height), h)
    x0, y0 = torch.where(none, 0.0, x0), torch.where(none, 0.0, y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1).float()


def solarize(img: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels at or above the threshold (PIL's ImageOps.solarize(img, 128) on [0, 1] values)."""
    return torch.where(img >= threshold, 1.0 - img, img)


class MultiCrop:
    """DINO's multi-crop augmentation on a batch of RGB images in [0, 1] (B, 3, H, W), on their device.

    Returns 2 + n_local views, each (B, 3, size, size): the two global views first (random resized crop of
    area `global_scale` to `global_size`), then the local views (`local_scale` to `local_size`). Each view
    then gets a horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2,
    hue 0.1) with p 0.8, grayscale with p 0.2, a Gaussian blur (sigma uniform in [0.1, 2]) with p 1.0 on
    the first global view, 0.1 on the second and 0.5 on the local ones, and solarisation with p 0.2 on the
    second global view. Every random number comes from `generator` (a CPU torch.Generator), so the views
    are the same for the same generator state on any device."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), p_jitter: float = 0.8,
                 p_gray: float = 0.2, sigma: tuple[float, float] = (0.1, 2.0)):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.jitter, self.p_jitter, self.p_gray, self.sigma = jitter, p_jitter, p_gray, sigma

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        B, _, H, W = images.shape
        images = images.float()
        views = []
        for i in range(2):
            crops = self.crop(images, random_resized_boxes(B, H, W, self.global_scale, generator), self.global_size)
            views.append(self.photometric(crops, generator, p_blur=(1.0, 0.1)[i], p_solarize=(0.0, 0.2)[i]))
        if self.n_local:
            # one roi_align for all local views: box j * B + b is local view j of image b
            boxes = random_resized_boxes(B * self.n_local, H, W, self.local_scale, generator)
            crops = self.crop(images.repeat(self.n_local, 1, 1, 1), boxes, self.local_size)
            views += list(self.photometric(crops, generator, p_blur=0.5, p_solarize=0.0).split(B))
        return views

    @staticmethod
    def crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """Box i of image i resampled to (size, size), bilinear, with ceil(box / size) samples per output
        pixel and axis (roi_align's adaptive sampling, which averages when shrinking)."""
        idx = torch.arange(len(boxes), dtype=boxes.dtype)[:, None]
        rois = to_device(torch.cat([idx, boxes], 1).to(images.dtype), images.device)
        return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)

    def photometric(self, img: torch.Tensor, generator: torch.Generator, p_blur: float,
                    p_solarize: float) -> torch.Tensor:
        n, dev = img.shape[0], img.device
        u = torch.rand(n, 11, generator=generator)
        b, c, s, h = self.jitter
        factors = torch.stack([1 + b * (2 * u[:, 1] - 1), 1 + c * (2 * u[:, 2] - 1),
                               1 + s * (2 * u[:, 3] - 1), h * (2 * u[:, 4] - 1)], 1)
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, 7]
        flip, jitter, gray = u[:, 0] < 0.5, u[:, 5] < self.p_jitter, u[:, 6] < self.p_gray
        blur, solar = u[:, 8] < p_blur, u[:, 9] < p_solarize

        # one host -> device copy for all of this call's random values (each copy of its own would wait for the GPU)
        on_dev = to_device(torch.cat([factors, sigma[:, None], torch.stack([flip, jitter, gray, blur, solar], 1)
                                      .to(factors.dtype)], 1), dev)
        factors_d, sigma_d, masks_d = on_dev[:, :4], on_dev[:, 4], on_dev[:, 5:].bool()

        def where(j, new, old):  # j: column of masks_d (0 flip, 1 jitter, 2 gray, 3 blur, 4 solarize)
            return torch.where(masks_d[:, j].view(-1, 1, 1, 1), new, old)

        img = where(0, img.flip(-1), img)
        if jitter.any():
            img = where(1, color_jitter(img, factors_d), img)
        if gray.any():
            img = where(2, grayscale(img).expand_as(img), img)
        if blur.any():
            img = where(3, gaussian_blur3(img, sigma_d), img)
        if solar.any():
            img = where(4, solarize(img), img)
        return img.clamp_(0, 1)  # resampling and blur are convex but round: 1 + 1e-7 happens


# -- loss -------------------------------------------------------------------------------------------
class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax of each global view and the student's
    log-softmax of every *other* view, averaged over the batch and over the view pairs.

    student_out: (n_crops * B, out_dim), view-major (rows v*B .. (v+1)*B-1 are view v);
    teacher_out: (2 * B, out_dim), the two global views in the same order.
    The teacher temperature rises linearly from `warmup_teacher_temp` to `teacher_temp` over
    `warmup_teacher_temp_epochs` epochs, then stays (with the defaults it is 0.04 throughout; DINO's
    recommended schedule is 0.04 -> 0.07 over 30 epochs). Each call updates the centre by an EMA of the
    teacher's batch mean (no gradient)."""

    def __init__(self, out_dim: int, n_crops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp_at(self, epoch: int) -> float:
        if epoch < self.warmup_teacher_temp_epochs:
            ramp = np.linspace(self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)
            return float(ramp[epoch])
        return self.teacher_temp

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        B = teacher_out.shape[0] // 2
        log_p = F.log_softmax(student_out / self.student_temp, dim=-1).view(self.n_crops, B, -1)   # (V, B, K)
        q = F.softmax((teacher_out - self.center) / self.teacher_temp_at(epoch), dim=-1).detach().view(2, B, -1)
        # ce[t, v] = mean over the batch of -sum_k q[t] * log_p[v]
        ce = -torch.einsum("tbk,vbk->tv", q, log_p) / B
        different = ~torch.eye(2, self.n_crops, dtype=torch.bool, device=ce.device)
        loss = ce[different].mean()
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher outputs over the batch (both views)."""
        batch_center = teacher_out.mean(0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# -- schedules --------------------------------------------------------------------------------------
def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per step: a linear ramp from `warmup_start` towards `start` over `warmup_steps` steps, then
    a half cosine from `start` (first step after the warm-up) to `end` (last step)."""
    if total_steps < 1:
        raise ValueError(f"cosine_schedule: total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)
    ramp = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    cosine = start + (end - start) * 0.5 * (1 - np.cos(np.pi * t))
    return np.concatenate([ramp, cosine])


# -- training ---------------------------------------------------------------------------------------
class DINOTrainer:
    """Student (backbone + head), EMA teacher, DINO loss, AdamW with cosine schedules.

    The teacher starts as a copy of the student. Each step: multi-crop the batch, student forward on all
    views, teacher forward on the 2 global views, DINO loss, backward, drop the head's last-layer gradient
    during the first `freeze_last_layer` epochs, clip each parameter's gradient norm to `clip_grad` (as
    DINO does), AdamW step with this step's lr and weight decay (as DINO: on every parameter except biases
    and 1-D parameters such as the norms'), then teacher <- m * teacher + (1 - m) * student with this step's
    momentum m.

    `backbone` is a trainable `DinoViT`; its forward on RGB in [0, 1] is the final normed [CLS] token."""

    def __init__(self, backbone: DinoViT, head: DINOHead, multicrop: MultiCrop, *, epochs: int, steps_per_epoch: int,
                 lr: float = 5e-4, min_lr: float = 1e-6, warmup_epochs: int = 0, weight_decay: float = 0.04,
                 weight_decay_end: float = 0.4, momentum_teacher: float = 0.996, momentum_teacher_end: float = 1.0,
                 clip_grad: float = 3.0, freeze_last_layer: int = 1, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", amp: bool = False, total_steps: int | None = None,
                 warmup_steps: int | None = None, compile: bool = False, compile_backend: str = "inductor"):
        self.device = torch.device(device)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head}).to(self.device).train()
        self.teacher = copy.deepcopy(self.student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.multicrop = multicrop
        out_dim = head.last_layer.weight_v.shape[0]
        self.loss_fn = DINOLoss(out_dim, multicrop.n_crops, warmup_teacher_temp, teacher_temp,
                                warmup_teacher_temp_epochs).to(self.device)
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.clip_grad, self.freeze_last_layer, self.amp = clip_grad, freeze_last_layer, amp
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

        # decayed group first: its weight decay follows the schedule, the other group's stays 0
        self.optimizer = torch.optim.AdamW(decay_groups(self.student.named_parameters(), weight_decay), lr=lr)

        # the schedules span `total_steps` (default: epochs x steps_per_epoch); warm-up: `warmup_steps`, else
        # warmup_epochs x steps_per_epoch
        total = total_steps if total_steps is not None else epochs * steps_per_epoch
        self.total_steps = total
        warmup = warmup_steps if warmup_steps is not None else warmup_epochs * steps_per_epoch
        self.lr_schedule = cosine_schedule(lr, min_lr, total, warmup)
        self.wd_schedule = cosine_schedule(weight_decay, weight_decay_end, total)
        self.momentum_schedule = cosine_schedule(momentum_teacher, momentum_teacher_end, total)
        self.history: list[dict] = []  # one row per step: step, epoch, loss, lr, weight_decay, momentum, teacher_temp
        # torch.compile of the backbone forwards (student and teacher); the modules and their parameters are shared
        self.forward = {}
        if compile:
            self.forward = {id(m): torch.compile(m["backbone"], backend=compile_backend)
                            for m in (self.student, self.teacher)}

    @staticmethod
    def embed(model: nn.ModuleDict, views: list[torch.Tensor], forward: Callable | None = None) -> torch.Tensor:
        """Head outputs of all views, view-major. Views of the same size go through the backbone together
        (`forward`: the backbone's forward to call, e.g. its torch.compile'd version; default the backbone)."""
        backbone: DinoViT = model["backbone"]
        forward = backbone if forward is None else forward
        cls, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            x = torch.cat(views[start:end])
            cls.append(forward(backbone.normalize(x))[:, 0])
            start = end
        return model["head"](torch.cat(cls))

    def train_step(self, images: torch.Tensor, step: int) -> float:
        """One optimisation step on a batch of RGB images in [0, 1] (B, 3, H, W); `step` is the global step
        index (epoch * steps_per_epoch + iteration) that selects the schedules' values."""
        epoch = step // self.steps_per_epoch
        lr, wd, m = (float(s[step]) for s in (self.lr_schedule, self.wd_schedule, self.momentum_schedule))
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd

        views = self.multicrop(images.to(self.device, non_blocking=True), self.generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                teacher_out = self.embed(self.teacher, views[:2], self.forward.get(id(self.teacher)))
            student_out = self.embed(self.student, views, self.forward.get(id(self.student)))
        loss = self.loss_fn(student_out.float(), teacher_out.float(), epoch)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < self.freeze_last_layer:
            for p in self.student["head"].last_layer.parameters():
                p.grad = None
        if self.clip_grad:
            clip_each_(self.student.parameters(), self.clip_grad)
        self.optimizer.step()
        self.update_teacher(m)

        # the step's one read-back, at its end: a check before the backward would make the host wait for the
        # forward before queueing the rest. A non-finite loss stops the run before anything is saved.
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"DINO loss is {value} at step {step}, stopping")
        row = {"step": step, "epoch": epoch, "loss": value, "lr": lr, "weight_decay": wd,
               "momentum": m, "teacher_temp": self.loss_fn.teacher_temp_at(epoch)}
        self.history.append(row)
        return row["loss"]

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: student, teacher, optimizer, the loss centre, the
        augmentation generator and the history (the step to continue from is len(history))."""
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "center": self.loss_fn.center.detach().cpu().clone(),
                "generator": self.generator.get_state(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.center.copy_(state["center"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        t = list(self.teacher.parameters())
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    def train_epoch(self, batches: Iterable[torch.Tensor], epoch: int, progress: bool = True) -> list[float]:
        """Train on the batches of one epoch (at most `steps_per_epoch`); returns the losses of its steps."""
        losses = []
        bar = show_progress(batches, total=self.steps_per_epoch, desc=f"dino epoch {epoch + 1}/{self.epochs}",
                            unit="step", disable=not progress, leave=False)
        for i, images in enumerate(bar):
            if i == self.steps_per_epoch:
                break
            losses.append(self.train_step(images, epoch * self.steps_per_epoch + i))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        return losses

    def fit(self, batches_for_epoch: Callable[[int], Iterable[torch.Tensor]], progress: bool = True) -> list[float]:
        """Train for all epochs; `batches_for_epoch(epoch)` gives the batches of that epoch. Returns the loss of
        every step."""
        losses = []
        for epoch in range(self.epochs):
            losses += self.train_epoch(batches_for_epoch(epoch), epoch, progress)
        return losses


# -- checkpoint -------------------------------------------------------------------------------------
def _prefixed(prefix: str, module: nn.Module) -> dict:
    return {prefix + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_dino_checkpoint(path: str | Path, teacher_backbone: DinoViT, student_backbone: DinoViT | None = None,
                         head: DINOHead | None = None, student_head: DINOHead | None = None,
                         extra: dict | None = None) -> Path:
    """Write a checkpoint in the official DINO layout: {"teacher": {"backbone.<timm key>": ..., "head.<key>":
    ...}, "student": {...} when given, plus `extra` entries (plain Python values) and "arch"/"patch_size"}.
    `transfgu.models.vit.load_dino_checkpoint` loads the teacher backbone with strict key matching.
    Written under a temporary name and renamed, so an interrupted write leaves no checkpoint."""
    path = Path(path)
    obj = {"teacher": _prefixed("backbone.", teacher_backbone.vit)}
    if head is not None:
        obj["teacher"].update(_prefixed("head.", head))
    if student_backbone is not None:
        obj["student"] = _prefixed("backbone.", student_backbone.vit)
        if student_head is not None:
            obj["student"].update(_prefixed("head.", student_head))
    obj["arch"], obj["patch_size"] = teacher_backbone.arch, teacher_backbone.patch_size
    obj.update(extra or {})
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return path
