"""P2 at small scale: does a deep plain network whose Jacobian is (close to) orthogonal train like a residual one?

Data: scikit-learn's digits (1797 images of 8x8 pixels, 10 classes), a stratified 75/25 train/test split, each
pixel centred by its training mean and all pixels divided by one common standard deviation. The MLP reads the 64
pixels as a vector; the CNN reads the 1x8x8 image. ``orthofx.models``' ``deep_cnn`` is built for 3x32x32, but it
is all 3x3 convolutions with padding 1 and a global average pool, so ``deep_cnn(in_channels=1)`` runs on 1x8x8 as
it is: that is the cheap honest option (no resizing of the digits to 32x32, 16 times fewer pixels per conv).

Two plain networks, no residuals, no normalisation:

* MLP: ``orthofx.models.get("deep_mlp", depth=64)``: 64 Linear(64) + tanh layers, then the classifier;
* CNN: ``orthofx.models.get("deep_cnn", depth=32, in_channels=1)``: 32 3x3 convs (16 channels) + ReLU, global
  average pool, classifier.

Variants of each (same seed, so ``default`` and ``jacobian`` start from the same weights):

=====================  ========================================================================================
default                PyTorch's default initialisation
isometric              pass ``isometric_init`` on every Linear/Conv2d (orthogonal, delta-orthogonal for convs;
                       gain 1 for tanh: tanh's standard gain 5/3 made the MLP's Jacobian explode, singular
                       values up to 3e3; gain sqrt(2) for ReLU, 1 gave singular values ~5e-7)
jacobian               pass ``jacobian_isometry`` on the network's body (the ``jacobian`` preset: the top-level
                       Sequential, ||J^T J - I||_F^2 per sample, normalised, one probe, weight 0.1), default init
isometric+jacobian     both: isometric at initialisation, the regulariser keeps it (P2's recipe)
abs+isometric          the same plain network with |x| as activation and isometric init: P2's layer
                       |Q x + b| with Q orthogonal, whose Jacobian is exactly orthogonal at initialisation
residual               the same layers with skip connections, x + act(layer(x)) / sqrt(depth) after the
                       first layer (written here in plain torch), default init; without the 1/sqrt(depth) branch
                       scale the residual CNN's Jacobian has singular values up to ~900 at initialisation and
                       training diverged (NaN at lr 0.01)
=====================  ========================================================================================

Every variant trains for the same number of SGD steps (momentum 0.9, minibatches of 64 drawn in the same order
for all variants; the regulariser is added to the loss with ``orthofx.penalty``) at its own learning rate: the
best final training loss on the grid 0.001, 0.003, 0.01, 0.03, 0.1 (``--tune`` reruns that search; the defaults
below are its result). One shared rate would be unfair: the best rates differ 30-fold between variants
(0.003 for the isometric MLP, 0.1 for the residual networks, which the exactly isometric MLP does not survive).
The script prints one table per network: the training loss after N steps (whole training set, eval mode), the
test accuracy, and the Jacobian spectrum of the body (input -> last hidden features) at initialisation: exact
singular values (``orthofx.metrics.jacobian_singular_values``, float64, a few training inputs one at a time)
summarised by ``m1``, ``m2``, the mean and mean square of the eigenvalues of J^T J per sample (isometry:
m1 = m2 = 1; ``orthofx.metrics.isometry_moments``), averaged over the inputs, and the smallest and largest
singular value. It writes a PNG (``--out``) with the spectra at initialisation (histograms of log10 sigma) and
the loss curves.

    python examples/deep_isometry.py [--out deep_isometry.png] [--quick] [--steps N] [--tune]

``--quick`` (for the tests) trains 14 steps and measures the spectrum on 1 input (about 15 s); the default (200
steps, 3 inputs) runs in about two minutes on two CPU cores, ``--tune`` about five times that. The script uses
one thread: the layers are small.

What it shows (200 steps, seed 0; measured on a shared 2-core CPU):

============================  =================  ==================  =================  ===================
variant                       MLP train loss     MLP m1 at init      CNN train loss     CNN m1 at init
============================  =================  ==================  =================  ===================
default                       2.30 (chance)      6e-32               2.30 (chance)      3e-25
isometric                     0.17, test 0.967   0.012               2.27               0.0012
jacobian                      2.30 (chance)      6e-32               2.30 (chance)      3e-25
isometric+jacobian            0.18, test 0.967   0.012               2.27               0.0012
abs+isometric                 2.29               1 (exact)           2.25               0.94
residual                      0.0007, test 0.98  0.30                0.57, test 0.80    3.1
============================  =================  ==================  =================  ===================

* Default initialisation kills the signal in both plain networks (singular values 1e-33 .. 1e-12): they stay at
  chance, and the Jacobian regulariser cannot rescue them, because its own gradient vanishes with the Jacobian.
* Orthogonal initialisation makes the tanh MLP trainable (test accuracy 0.967), but it does not train like the
  residual network, which reaches a 250 times lower training loss in the same steps. Its Jacobian is far from an
  isometry (tanh shrinks the signal over 64 layers: m1 = 0.012). The regulariser (the preset's weight 0.1) hardly
  moves the spectrum: after 200 steps at lr 0.003, m1 0.10 and m2 0.20 with it, 0.12 and 0.38 without, and the
  same loss. At lr 0.01 the regularised run followed the plain one for 100 steps, then its penalty rose, the loss
  spiked at step ~115 and the network collapsed to chance (m1 1e-44 afterwards); without it, 0.22.
* P2's exactly orthogonal construction (|Q x + b|, Jacobian singular values all 1) did not train at any rate of
  the grid in either network (the MLP not at 1e-4 or 3e-4 either): an orthogonal Jacobian at initialisation was
  not sufficient here. (In the CNN, 4 of the 64 pixels are zero in every training image; with a zero bias abs'
  and relu' vanish there, hence sigma min 0.)
* Delta-orthogonal initialisation of the ReLU CNN with one input channel is a per-pixel map at initialisation
  (only centre taps): the 32 layers mix no neighbouring pixels until training grows the other taps, and 200
  steps were not enough for any plain CNN variant; the residual CNN trains (0.57, test 0.80).

So on this data, at this budget, the measurements do not support "an orthogonal Jacobian trains like a residual
network": only the residual networks train well, and orthogonal initialisation helps the tanh MLP a lot but not
to the residual level. The regulariser's step costs 2-5 times the plain step here (``train s``; three runs on a
shared 2-core CPU: MLP 2.2-5.1x, CNN 3.7-5.1x; the MLP's 5.1x also in CPU time, session 37). ``train s`` is wall
time: other work on the machine inflates single rows (at load 6 on 2 cores one run printed 41 s against 1.3 s).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import orthofx
from orthofx.metrics import isometry_moments, jacobian_singular_values

from _cli import description, non_negative_int, png_path, positive_float, positive_int, require  # examples/_cli.py

VARIANTS = ("default", "isometric", "jacobian", "isometric+jacobian", "abs+isometric", "residual")
STEPS = 200
#: ``--quick``'s steps (the tests' run). The MLP's training loss after 14 steps on seeds 0-5: residual 0.21-0.26,
#: isometric 2.04-2.07, default 2.304-2.307 (after 20: 0.14-0.19, 1.88-1.92, 2.304-2.306).
QUICK_STEPS = 14
#: Learning rates ``--tune`` tries; the defaults below are each variant's best on this grid (measured).
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
#: Variants that start from another variant's weights (same seed, the regulariser changes no weight): the
#: spectrum at initialisation is measured once.
SAME_INIT = {"jacobian": "default", "isometric+jacobian": "isometric"}

#: Per network: the built-in model and its arguments, the body's attribute (its Jacobian is measured), the
#: activation, the activation gain the isometric initialisation uses, and the learning rate.
NETWORKS = {
    "mlp": {"model": "deep_mlp", "kwargs": {"depth": 64, "width": 64}, "body": "layers", "activation": "tanh",
            "init_activation": "linear",
            "lr": {"default": 0.01, "isometric": 0.003, "jacobian": 0.01, "isometric+jacobian": 0.003,
                   "abs+isometric": 0.003, "residual": 0.1}, "title": "64-layer plain MLP (tanh)"},
    "cnn": {"model": "deep_cnn", "kwargs": {"depth": 32, "width": 16, "in_channels": 1}, "body": "features",
            "activation": "relu", "init_activation": "relu",
            "lr": {"default": 0.01, "isometric": 0.003, "jacobian": 0.01, "isometric+jacobian": 0.01,
                   "abs+isometric": 0.01, "residual": 0.1}, "title": "32-layer plain CNN (ReLU)"},
}


def jacobian_rules() -> list[dict]:
    """The ``jacobian`` preset's rules as data, so that they combine with the initialisation rule. The preset's
    rule is optional (models without a top-level Sequential); here it must apply, or the ``jacobian`` variants
    would silently train the plain network: transform raises when it matches nothing."""
    rules = orthofx.Policy.preset("jacobian").to_dict()["rules"]
    for rule in rules:
        rule.pop("optional", None)
    return rules


def init_rule(activation: str, seed: int) -> dict:
    return {"name": "isometric-init", "match": {"type": ["Linear", "Conv2d"]}, "apply": "isometric_init",
            "with": {"activation": activation, "seed": seed}}


# ------------------------------------------------------------------------------------------------------ data


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits as float32 vectors of 64 pixels: per-pixel centring and one common scale, from the training split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(list(range(len(digits.target))), test_size=0.25, random_state=seed,
                                   stratify=digits.target)
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    mean = x[train].mean(0)
    scale = (x[train] - mean).std()
    x = (x - mean) / scale
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def as_input(arch: str, x: torch.Tensor) -> torch.Tensor:
    return x if arch == "mlp" else x.reshape(-1, 1, 8, 8)


# ------------------------------------------------------------------------------------------- residual networks


class Residual(nn.Module):
    """``x + scale * act(layer(x))``."""

    def __init__(self, layer: nn.Module, activation: nn.Module, scale: float = 1.0):
        super().__init__()
        self.layer = layer
        self.act = activation
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.act(self.layer(x))


class ResidualMLP(nn.Module):
    """deep_mlp's layers with skip connections: Linear(64, w) + tanh, then depth - 1 residual blocks
    x + tanh(Linear(w)(x)) / sqrt(depth); same parameters as deep_mlp."""

    def __init__(self, depth: int = 64, width: int = 64, in_features: int = 64, num_classes: int = 10):
        super().__init__()
        blocks: list[nn.Module] = [nn.Linear(in_features, width), nn.Tanh()]
        blocks += [Residual(nn.Linear(width, width), nn.Tanh(), depth ** -0.5) for _ in range(depth - 1)]
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(x))


class ResidualCNN(nn.Module):
    """deep_cnn's layers with skip connections: conv(1 -> w) + ReLU, then depth - 1 residual blocks
    x + relu(conv3x3(w)(x)) / sqrt(depth), global average pool, classifier; same parameters as deep_cnn."""

    def __init__(self, depth: int = 32, width: int = 16, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        blocks += [Residual(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), depth ** -0.5)
                   for _ in range(depth - 1)]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------------- variants


def build(arch: str, variant: str, seed: int) -> tuple[nn.Module, nn.Module, bool]:
    """``(module to train, eager body with the same initial weights, whether it carries a penalty)``.

    The transformed GraphModule inlines the body's Sequential (it has no callable ``layers`` of its own), so the
    spectrum is measured on the eager model with the GraphModule's weights loaded (same state_dict keys).
    """
    spec = NETWORKS[arch]
    torch.manual_seed(seed)
    if variant == "residual":
        model = (ResidualMLP if arch == "mlp" else ResidualCNN)(**spec["kwargs"])
        return model, getattr(model, spec["body"]), False
    kwargs = {**spec["kwargs"], "activation": spec["activation"]}
    init_activation = spec["init_activation"]
    if variant == "abs+isometric":
        kwargs["activation"] = init_activation = "abs"
    model = orthofx.models.get(spec["model"], **kwargs)
    rules = []
    if variant in ("isometric", "isometric+jacobian", "abs+isometric"):
        rules.append(init_rule(init_activation, seed))
    if variant in ("jacobian", "isometric+jacobian"):
        rules += jacobian_rules()
    if not rules:
        return model, getattr(model, spec["body"]), False
    gm = orthofx.transform(model, {"rules": rules})
    model.load_state_dict(gm.state_dict())
    return gm, getattr(model, spec["body"]), "jacobian" in variant


def spectrum(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Singular values of the body's Jacobian at each input, one input at a time (float64), shape (inputs, 64)."""
    body.eval()
    return torch.stack([jacobian_singular_values(body, x[i:i + 1], dtype=torch.float64) for i in range(len(x))])


def batches(n: int, size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Minibatch indices for ``steps`` steps: shuffled epochs from a private generator (the same for every run)."""
    generator = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=generator)
        out += [order[i:i + size] for i in range(0, n - size + 1, size)]
    return out[:steps]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(1) == y).float().mean())
    model.train()
    return loss, accuracy


def train(model: nn.Module, with_penalty: bool, x: torch.Tensor, y: torch.Tensor, order: list[torch.Tensor],
          lr: float) -> list[float]:
    """SGD with momentum over the minibatches ``order``; returns the task loss per step (stops at a NaN/inf)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses: list[float] = []
    for idx in order:
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        total = loss + orthofx.penalty(model) if with_penalty else loss
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    return losses


def run(arch: str, data: dict, steps: int, spectrum_inputs: int, rates: dict[str, tuple[float, ...]],
        seed: int) -> list[dict]:
    """Every variant: spectrum at initialisation, then training at each of its learning rates; the row keeps the
    rate with the lowest final training loss (a NaN counts as the worst) and lists all of them in ``grid``."""
    x_train, x_test = as_input(arch, data["x_train"]), as_input(arch, data["x_test"])
    order = batches(len(x_train), 64, steps, seed)
    probe_inputs = x_train[:spectrum_inputs]
    rows = []
    spectra: dict[str, torch.Tensor] = {}
    for variant in VARIANTS:
        best = None
        grid = []
        for lr in rates[variant]:
            model, body, with_penalty = build(arch, variant, seed)
            if variant not in spectra:
                same = SAME_INIT.get(variant)
                spectra[variant] = spectra[same] if same in spectra else spectrum(body, probe_inputs)
            sv = spectra[variant]
            start = time.perf_counter()
            losses = train(model, with_penalty, x_train, data["y_train"], order, lr)
            seconds = time.perf_counter() - start
            train_loss, _ = evaluate(model, x_train, data["y_train"])
            _, accuracy = evaluate(model, x_test, data["y_test"])
            score = train_loss if math.isfinite(train_loss) else math.inf
            grid.append((lr, train_loss))
            if best is None or score < best["score"]:
                best = {"lr": lr, "train_loss": train_loss, "test_acc": accuracy, "seconds": seconds,
                        "losses": losses, "score": score}
        m1, m2 = isometry_moments(sv)
        best.pop("score")
        rows.append({"arch": arch, "variant": variant, **best, "grid": grid, "m1": float(m1.mean()),
                     "m2": float(m2.mean()), "sigma_min": float(sv.min()), "sigma_max": float(sv.max()),
                     "sv": sv.flatten()})
    return rows


def print_table(arch: str, rows: list[dict], steps: int) -> None:
    print(f"\n{NETWORKS[arch]['title']}: {steps} SGD steps (momentum 0.9, batch 64); spectrum of the body's "
          "Jacobian at initialisation")
    header = (f"{'variant':<20} {'lr':>6} {'train loss':>10} {'test acc':>8} {'m1':>9} {'m2':>9} {'sigma min':>9} "
              f"{'sigma max':>9} {'train s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:<20} {r['lr']:>6g} {r['train_loss']:>10.4f} {r['test_acc']:>8.3f} {r['m1']:>9.3g} "
              f"{r['m2']:>9.3g} {r['sigma_min']:>9.2g} {r['sigma_max']:>9.2g} {r['seconds']:>7.1f}")
    if any(len(r["grid"]) > 1 for r in rows):
        print("learning-rate grid (final training loss):")
        for r in rows:
            print(f"  {r['variant']:<20} " + "  ".join(f"{lr:g}: {loss:.4f}" for lr, loss in r["grid"]))


def _style(variant: str) -> str:
    """Dashed lines for the regularised variants, which start from another variant's weights (same spectrum)."""
    return "--" if variant in SAME_INIT else "-"


def plot(results: dict[str, list[dict]], path: str, steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 8.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (arch, rows) in enumerate(results.items()):
        spectra, curves = axes[0][col], axes[1][col]
        logs = [torch.log10(r["sv"].clamp_min(1e-300)) for r in rows]
        low = max(min(float(v.min()) for v in logs), -40.0)
        high = max(float(v.max()) for v in logs)
        bins = torch.linspace(low - 0.25, high + 0.25, 60).tolist()
        for i, (r, values) in enumerate(zip(rows, logs)):
            spectra.hist(values.clamp_min(low).tolist(), bins=bins, histtype="step", linewidth=1.4,
                         linestyle=_style(r["variant"]), color=colours[i % len(colours)],
                         label=f"{r['variant']} (m1 {r['m1']:.2g}, m2 {r['m2']:.2g})")
        spectra.axvline(0.0, color="grey", linestyle=":", linewidth=0.8)
        clipped = any(float(v.min()) < low for v in logs)
        spectra.set_xlabel("log10 singular value of the body's Jacobian at initialisation"
                           + (f"\n(zeros and values below 1e{low:.0f} drawn at {low:.0f})" if clipped else ""))
        spectra.set_ylabel("count")
        spectra.set_title(NETWORKS[arch]["title"])
        spectra.legend(fontsize=7)
        for i, r in enumerate(rows):
            values = torch.tensor(r["losses"])
            window = max(1, min(10, len(values) // 5))
            smooth = torch.nn.functional.avg_pool1d(values[None, None], window, stride=1)[0, 0]
            curves.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), linestyle=_style(r["variant"]),
                        color=colours[i % len(colours)],
                        label=f"{r['variant']} (lr {r['lr']:g}, test acc {r['test_acc']:.2f})")
        curves.set_yscale("log")
        curves.set_xlim(0, steps)
        curves.set_xlabel("step")
        curves.set_ylabel(f"training loss (minibatch, moving mean of {window})")
        curves.legend(fontsize=7)
    fig.suptitle("Plain deep networks on digits: isometric Jacobian vs residual connections (P2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--out", type=png_path, default="deep_isometry.png", help="PNG path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, spectra on 1 input (for the "
                        "tests)")
    parser.add_argument("--steps", type=positive_int, default=None, help=f"training steps (default {STEPS}; "
                        f"{QUICK_STEPS} with --quick)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=positive_float, default=None, help="one learning rate for every variant "
                      "(default: each variant's own, tuned with --tune)")
    rate.add_argument("--tune", action="store_true", help="train every variant at every learning rate of "
                      f"{LR_GRID} and keep the best (slow: about five times the default run)")
    parser.add_argument("--arch", choices=("mlp", "cnn", "both"), default="both",
                        help="the 64-layer MLP, the 32-layer CNN or both (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the data split, the weights and the batch order (default: %(default)s)")
    args = parser.parse_args(argv)
    require(parser, "sklearn", "matplotlib")

    torch.set_num_threads(1)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    spectrum_inputs = 1 if args.quick else 3
    start = time.perf_counter()
    data = load_data(args.seed)
    print(f"digits: {len(data['y_train'])} training and {len(data['y_test'])} test images")
    results = {}
    for arch in (("mlp", "cnn") if args.arch == "both" else (args.arch,)):
        if args.tune:
            rates = {variant: LR_GRID for variant in VARIANTS}
        elif args.lr is not None:
            rates = {variant: (args.lr,) for variant in VARIANTS}
        else:
            rates = {variant: (NETWORKS[arch]["lr"][variant],) for variant in VARIANTS}
        results[arch] = run(arch, data, steps, spectrum_inputs, rates, args.seed)
        print_table(arch, results[arch], steps)
    plot(results, args.out, steps)
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
