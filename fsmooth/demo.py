"""``fsmooth demo`` and ``fsmooth defend``: Active Defense on the embedded model (or any checkpoint).

The demo measures, on N CIFAR-10 test images: clean accuracy without and with
Active Defense; accuracy under a quick L-inf PGD (eps 8/255, random start)
against the bare model and against the defended classifier (the attack
differentiates through the defense with its straight-through gradient, i.e. it
attacks the defended system itself); defense iterations; time per image. It
writes a Figure-4-style PNG: clean, adversarial, noisy and defended image, each
with one feature channel of the defended layer.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import CIFAR10_CLASSES, DATASET_NAMES, DataError, cache_dir, load_dataset
from .defense import DefendedClassifier, DefenseConfig
from .figures import figure4
from .models import zoo

__all__ = ["run_demo", "run_defend", "load_classifier", "pgd_linf", "demo_images", "figure4"]

CPU_IMAGES, GPU_IMAGES = 16, 256


def load_classifier(spec: str | None, device) -> tuple[nn.Module, dict, str]:
    """``(model, meta, label)``: :func:`fsmooth.models.zoo.load_classifier` and the name the tables show."""
    model, meta = zoo.load_classifier(spec, device=device)
    return model, meta, str(spec if spec is not None else zoo.DEFAULT_PRETRAINED)


def demo_images(data, n: int, dataset: str = "cifar10") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seed-independent choice of ``n`` test images (uint8) and labels.

    From ``data`` / ``$FSMOOTH_DATA``, else a torchvision download into the fsmooth
    cache; ``ValueError`` with instructions when none is reachable.
    """
    if data is not None and not str(data).strip():
        raise DataError("--data is empty: pass a data source's path, or leave --data out")
    source = data if data is not None else (os.environ.get("FSMOOTH_DATA") or None)  # set but empty: unset
    if source is None:
        root = cache_dir() / "torchvision"
        try:
            import torchvision  # optional: only the download fallback needs it
            cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
            cls(str(root), train=False, download=True)
            source = root
        except Exception as exc:
            raise ValueError(
                "no test images: pass --data PATH (a cifar-10-batches-py folder, an ImageFolder tree or a .tar.gz "
                f"of one) or set FSMOOTH_DATA; the torchvision download into {str(root)!r} failed "
                f"({type(exc).__name__}: {exc})") from exc
    images, labels = load_dataset(source, "test", dataset)
    index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1234))[:n].sort().values
    return images[index], labels[index]


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 10,
             alpha: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD with a uniform random start, maximising cross-entropy: :class:`fsmooth.evaluation.attacks.EOTPGD`
    with one draw and one start, seeded from ``generator``; returns ``x_adv``."""
    from .evaluation.attacks import EOTPGD  # needs pyautoattack (an optional dependency), so only when attacking
    seed = int(torch.randint(2 ** 31 - 1, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    attack = EOTPGD(model, eps, steps=steps, eot_iter=1, n_restarts=1, alpha=alpha, loss="ce", seed=seed)
    return attack(x, y)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _defense_config(model, max_iters) -> DefenseConfig:
    return DefenseConfig.for_model(model, max_iters=max_iters)


def run_demo(args) -> int:
    """The ``fsmooth demo`` subcommand: prints the table, writes the figure; returns the exit code."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, meta, label = load_classifier(args.model, device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fsmooth demo: {exc}", file=sys.stderr)
        return 2
    n = args.num_images or (GPU_IMAGES if device.type == "cuda" else CPU_IMAGES)
    try:
        images, labels = demo_images(args.data, n, meta.get("dataset", "cifar10"))
    except ValueError as exc:
        print(f"fsmooth demo: {exc}", file=sys.stderr)
        return 2
    x_all = images.to(device).float() / 255
    y_all = labels.to(device)
    n = x_all.shape[0]
    batch = args.batch_size or (n if device.type == "cuda" else 8)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    config = _defense_config(model, args.max_iters)
    defended = DefendedClassifier(model, config, generator=gen)
    quiet = args.quiet
    clean_ok = torch.zeros(n, dtype=torch.bool, device=device)
    clean_def_ok, adv_ok, adv_def_ok = clean_ok.clone(), clean_ok.clone(), clean_ok.clone()
    iterations, seconds = [], 0.0
    eps = args.eps / 255  # the command line's eps is in 1/255 units
    x_adv_def_all = torch.empty_like(x_all)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # unconverged samples are counted in the table
        for sl in tqdm(list(_batches(n, batch)), desc="demo", disable=quiet):
            x, y = x_all[sl], y_all[sl]
            with torch.no_grad():
                clean_ok[sl] = model(x).argmax(1) == y
            start = time.perf_counter()
            with torch.no_grad():
                clean_def_ok[sl] = defended(x).argmax(1) == y
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            iterations.append(defended.last_info.iterations.cpu())
            x_adv = pgd_linf(model, x, y, eps, args.pgd_steps, generator=gen)
            with torch.no_grad():
                adv_ok[sl] = model(x_adv).argmax(1) == y
            x_adv_def = pgd_linf(defended, x, y, eps, args.pgd_steps, generator=gen)
            x_adv_def_all[sl] = x_adv_def
            with torch.no_grad():
                adv_def_ok[sl] = defended(x_adv_def).argmax(1) == y
        path = figure4(model, defended, x_all[:1], x_adv_def_all[:1], args.output, config, gen)
    iters = torch.cat(iterations).double()
    pct = lambda t: f"{100 * t.float().mean().item():6.2f}%"  # noqa: E731
    print(f"model: {label} ({meta.get('arch')}, trained {meta.get('epoch')} epochs on "
          f"{meta.get('device', '?')}); beta = {config.beta:g}, delta_test = {config.delta}; device: {device}")
    dataset = meta.get("dataset", "cifar10")
    dataset = DATASET_NAMES.get(dataset, dataset)
    print(f"{n} test images of {dataset} ({_data_label(args.data)}); PGD L-inf eps {args.eps:g}/255, "
          f"{args.pgd_steps} steps, random start")
    rows = [("clean accuracy", pct(clean_ok), pct(clean_def_ok)),
            (f"PGD-{args.pgd_steps} accuracy", pct(adv_ok), pct(adv_def_ok))]
    print(f"{'':<20}{'no defense':>12}{'Active Defense':>16}")
    for name, a, b in rows:
        print(f"{name:<20}{a:>12}{b:>16}")
    print(f"defense iterations (clean): mean {iters.mean():.1f}, min {iters.min():.0f}, max {iters.max():.0f}")
    print(f"defended classification time: {1000 * seconds / n:.1f} ms/image")
    print(f"wrote {path}")
    return 0


def _data_label(data) -> str:
    source = str(data or os.environ.get("FSMOOTH_DATA") or "torchvision download")
    return "JPEG q75 copy" if "jpeg" in source.lower() else source


def _read_image(path: str) -> torch.Tensor:
    from PIL import Image  # optional (Pillow): only `fsmooth defend` reads image files
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}") from exc
    return data.view(32, 32, 3).permute(2, 0, 1).float() / 255


def run_defend(args) -> int:
    """The ``fsmooth defend`` subcommand: one line per image, without and with the defense."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, meta, label = load_classifier(args.model, device)
        x = torch.stack([_read_image(p) for p in args.images]).to(device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fsmooth defend: {exc}", file=sys.stderr)
        return 2
    classes = meta.get("classes") or (CIFAR10_CLASSES if model.config["num_classes"] == 10 else None)
    name = (lambda i: classes[i]) if classes else str
    gen = torch.Generator(device=device).manual_seed(args.seed)
    config = _defense_config(model, args.max_iters)
    defended = DefendedClassifier(model, config, outer_loops=args.outer_loops, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        plain = model(x).softmax(1)
        protected = defended(x).softmax(1)
    iters = defended.last_info.iterations.view(args.outer_loops, -1).double().mean(0)
    print(f"model: {label}; beta = {defended.config.beta:g}, delta_test = {defended.config.delta}; "
          f"outer loops {args.outer_loops}")
    print(f"{'image':<40}{'no defense':>22}{'Active Defense':>22}{'iters':>8}")
    for i, path in enumerate(args.images):
        p, q = plain[i].max(0), protected[i].max(0)
        print(f"{Path(path).name[:39]:<40}{name(int(p.indices)) + f' {p.values:.2f}':>22}"
              f"{name(int(q.indices)) + f' {q.values:.2f}':>22}{iters[i]:>8.0f}")
    return 0
