r"""When does an orthogonal convolution exist, and how well does :math:`L_{orth}` measure orthogonality?

Facts from P0 (Achour, Malgouyres, Mamalet, JMLR 2022, "Existence, stability and scalability of orthogonal
convolutional layers"), generalised here to non-square kernels and strides, to grouped convolutions and to the
two non-circular boundary conditions.

Notation (P0): a convolution with kernel :math:`K \in \mathbb{R}^{M \times C \times k_1 \times \dots \times k_d}`
(:math:`M` output channels, :math:`C` input channels, :math:`d \in \{1, 2, 3\}` spatial dimensions), stride
:math:`S` (per dimension :math:`S_i`), output grid :math:`N^d`, input grid :math:`(SN)^d`. Its matrix
:math:`\mathcal{K}` has :math:`M N^d` rows and :math:`C (SN)^d` columns, so it can be

* row orthogonal (RO, :math:`\mathcal{K}\mathcal{K}^T = I`) only when :math:`M \le C S^d`, and
* column orthogonal (CO, :math:`\mathcal{K}^T\mathcal{K} = I`) only when :math:`M \ge C S^d`.

When :math:`M = C S^d` both coincide (the operator is square); this module then reports the RO case.
With non-square strides :math:`S^d` reads :math:`\prod_i S_i`.

Theorem 4 (circular padding, :math:`SN \ge k`): an orthogonal convolution exists

* in the RO case iff :math:`M \le C k^d`,
* in the CO case iff :math:`S \le k`.

Non-square kernels or strides (derived by us, checked numerically in ``tests/test_theory.py``): a tap ``p``
of the kernel reads the input pixels congruent to ``p`` modulo ``S``, so only
:math:`\prod_i \min(k_i, S_i)` residues per input channel are ever read. The RO condition becomes
:math:`M \le C \prod_i \min(k_i, S_i)` (which is :math:`M \le C k^d` for square sizes in the RO case, but not
:math:`M \le C \prod_i k_i` in general: ``k = (1, 4)``, ``S = (4, 1)``, ``C = 1``, ``M = 2`` has none), and the
CO condition becomes :math:`S_i \le k_i` in every dimension. At :math:`M = C \prod_i S_i` both conditions agree.

Grouped convolutions are block diagonal: the conditions apply to each group's
``(c_in / groups, c_out / groups)``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from orthofx.errors import ArgumentError

__all__ = [
    "ExistenceResult",
    "adjoint_case",
    "orthogonality_case",
    "orthogonal_conv_exists",
    "theorem8_constants",
]

_PADDINGS = ("circular", "valid", "zeros")


class ExistenceResult(NamedTuple):
    r"""Answer of :func:`orthogonal_conv_exists`; unpacks as ``exists, case, reason``.

    ``exists``: whether an orthogonal convolution with this architecture exists.
    ``case``: ``"RO"`` (row orthogonal, :math:`M \le C S^d`) or ``"CO"`` (column orthogonal).
    ``reason``: one sentence quoting the condition with the layer's numbers.

    >>> from orthofx.theory import orthogonal_conv_exists
    >>> result = orthogonal_conv_exists(64, 128, 1, stride=2)    # the ResNet strided 1x1 shortcut
    >>> result.exists, result.case
    (False, 'RO')
    >>> print(result.reason)
    row-orthogonal case (M=128 <= C*S^d=256): exists iff M <= C*k^d, here 128 > 64
    >>> bool(result)                                             # a non-empty tuple: test result.exists
    True
    """

    exists: bool
    case: str
    reason: str


def _positive_int(value, name: str, error: type[ArgumentError] = ArgumentError, minimum: int = 1,
                  message: str | None = None) -> int:
    """``value`` as an int >= ``minimum`` (1: a positive integer); any integer type (numpy and torch ints too, as
    torch.nn layers accept), never a bool. ``error``: the class raised otherwise (orthofx.nn's layers raise
    LayerArgumentError), with ``message`` where the caller words the refusal itself."""
    given = value
    if not isinstance(value, bool):
        try:
            value = value.__index__()
        except (AttributeError, TypeError):  # no __index__, or a float tensor's, which raises
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(message or f"{name} must be {kind}, got {given!r}")
    if value < minimum:
        raise error(message or f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _flag(value, name: str, error: type[ArgumentError] = ArgumentError) -> bool:
    """``value`` as a bool if it is one (Python's, numpy's, a 0-d tensor's; the integers 0 and 1 too); anything
    else raises ``error``: a string or a list would silently count as true (``bias="no"`` built a bias), and an
    array has no single truth value."""
    try:
        boolean = not isinstance(value, (str, bytes)) and value in (True, False)
    except (RuntimeError, TypeError, ValueError):  # an array's or a multi-element tensor's truth value
        boolean = False
    if not boolean:
        raise error(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _real(value) -> float | None:
    """``value`` as a Python float if it is one real number: an int or a float, numpy's too (``np.float32(1e-5)``
    read from a config), a 0-d numpy array's (``np.array(2.0)``) and a 0-d real tensor's, as torch.nn layers take
    them (``nn.BatchNorm2d(4, eps=np.array(1e-5))``); ``None`` for anything else: a bool, numpy's and a bool
    tensor's too (``gain=True`` built a gain of 1 without a word), a string (``float("2")`` would read one), a
    complex number, an array or a tensor of several elements. The caller checks the range and names the argument.
    orthofx's one reading of a real argument (of an integer one: :func:`_positive_int`, of a flag: :func:`_flag`).

    >>> import numpy as np, torch
    >>> _real(np.float32(0.5)), _real(np.array(2.0)), _real(torch.tensor(2)), _real(True), _real("2")
    (0.5, 2.0, 2.0, None, None)
    """
    # numbers.Real: int, float, fractions and numpy's integer and floating scalars (not numpy's bool)
    if isinstance(value, numbers.Real):
        return None if isinstance(value, bool) else float(value)
    # a 0-d numpy array or tensor (duck-typed: this module does not import torch): its one element, read as above,
    # so that a bool, complex or string element is refused too
    if getattr(value, "shape", None) != () or not callable(getattr(value, "item", None)):
        return None
    try:
        item = value.item()
    except (RuntimeError, TypeError, ValueError):  # a meta tensor has no value
        return None
    return _real(item) if isinstance(item, numbers.Real) else None


def _sizes(value, dims: int, name: str, broadcast: bool = True) -> tuple[int, ...]:
    """An int or a tuple (list) of ``dims`` ints, each >= 1, as a tuple of length ``dims``; a one-element tuple
    applies to every dimension, as torch's convs take a stride or a dilation, unless ``broadcast`` is false (a
    ``kernel_size``: ``nn.Conv2d(2, 2, (3,))`` is no 2-d conv). Read by :func:`orthofx.nn.padding.per_dimension`
    (imported here, not at the top: orthofx.nn's layers import this module)."""
    from orthofx.nn.padding import per_dimension

    shape = f"an int or a tuple of {dims} ints (dims={dims})"
    try:
        return per_dimension(value, dims, name, item=lambda v: _positive_int(v, name), error=ArgumentError,
                             expected=shape, broadcast=broadcast)
    except ArgumentError:
        if isinstance(value, (tuple, list, str, bytes)) or not _iterable(value):
            raise
    # an array or a range: one size per dimension was meant, in a container this function does not read
    raise ArgumentError(f"{name} must be {shape}, got {value!r}") from None


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:  # (a 0-d tensor or array raises TypeError too)
        return False
    return True


def _dims(dims, where: str) -> int:
    dims = _positive_int(dims, f"{where}: dims")
    if dims > 3:
        raise ArgumentError(f"{where}: dims must be 1, 2 or 3 (spatial dimensions of the convolution), got {dims}")
    return dims


def _fmt(sizes: tuple[int, ...]) -> str:
    """``3`` for an isotropic size, ``(1, 3)`` otherwise."""
    return str(sizes[0]) if len(set(sizes)) == 1 else str(sizes)


def _channels(c_in, c_out, where: str) -> tuple[int, int]:
    """``(c_in, c_out)`` checked as channel counts, the errors naming the function ``where``."""
    return (_positive_int(c_in, f"{where}: c_in (the input channels)"),
            _positive_int(c_out, f"{where}: c_out (the output channels)"))


def _per_group(c_in, c_out, groups, where: str) -> tuple[int, int, int]:
    c_in, c_out = _channels(c_in, c_out, where)
    groups = _positive_int(groups, f"{where}: groups")
    if c_in % groups or c_out % groups:
        raise ArgumentError(
            f"{where}: groups={groups} must divide both c_in={c_in} and c_out={c_out} "
            f"(as in torch.nn.Conv2d); got c_in % groups = {c_in % groups}, c_out % groups = {c_out % groups}"
        )
    return c_in // groups, c_out // groups, groups


def orthogonality_case(c_in: int, c_out: int, stride=1, dims: int = 2) -> str:
    r"""Which kind of orthogonality a convolution can have: ``"RO"`` or ``"CO"``.

    The convolution matrix has :math:`M N^d` rows and :math:`C (SN)^d` columns (``M = c_out``,
    ``C = c_in``), so it is row orthogonal when possible if :math:`M \le C S^d` (``"RO"``), column orthogonal
    otherwise (``"CO"``). A non-square stride uses :math:`\prod_i S_i`. Groups do not change the case.

    >>> orthogonality_case(16, 32, stride=2)   # 32 <= 16 * 2**2
    'RO'
    >>> orthogonality_case(16, 32, stride=1)
    'CO'
    >>> orthogonality_case(3, 4, stride=(2, 1))
    'RO'
    """
    dims = _dims(dims, "orthogonality_case")
    c_in, c_out = _channels(c_in, c_out, "orthogonality_case")
    strides = _sizes(stride, dims, "orthogonality_case: stride")
    return "RO" if c_out <= c_in * math.prod(strides) else "CO"


def adjoint_case(case: str) -> str:
    r"""The case of the adjoint operator (e.g. a transposed conv, the adjoint of the conv with its weight):
    :math:`T T^T = I` for :math:`T` is :math:`(T^T)^T T^T = I`, so ``"RO"`` and ``"CO"`` swap.

    >>> adjoint_case("RO")
    'CO'
    """
    # (checked as a string first: a list or an array cannot be looked up in a dict)
    swapped = {"RO": "CO", "CO": "RO"}.get(case) if isinstance(case, str) else None
    if swapped is None:
        raise ArgumentError(f"adjoint_case: case must be 'RO' or 'CO', got {case!r}")
    return swapped


def orthogonal_conv_exists(
    c_in: int,
    c_out: int,
    kernel_size,
    stride=1,
    dims: int = 2,
    groups: int = 1,
    padding: str = "circular",
    dilation=1,
) -> ExistenceResult:
    r"""Whether an orthogonal convolution with this architecture exists (P0 Theorem 4, Propositions 5 and 6).

    ``M = c_out / groups`` and ``C = c_in / groups`` are the per-group channel counts; ``k`` the kernel size and
    ``S`` the stride (ints, or tuples of length ``dims``; a one-element stride or dilation tuple applies to every
    dimension, as in torch's convs). The case is RO when :math:`M \le C \prod_i S_i`,
    CO otherwise (:func:`orthogonality_case`). The grid is assumed large enough (``N >= 2k - 1`` as in P0) and,
    for ``"zeros"``, the input size a multiple of the stride.

    ``padding="circular"`` (Theorem 4):
        RO: exists iff :math:`M \le C k^d`; CO: exists iff :math:`S \le k`. For non-square sizes:
        RO iff :math:`M \le C \prod_i \min(k_i, S_i)`, CO iff :math:`S_i \le k_i` for every ``i``.

    ``padding="valid"`` (no padding; Proposition 5):
        RO as for circular padding. CO: P0's Proposition 5 says none exists. We refine (derived by us,
        checked numerically in the tests): the border input pixels are read by fewer taps than the interior ones,
        which forces every tap outside one block of ``S`` taps to vanish; so a CO convolution exists exactly
        when the windows tile the input without overlap, :math:`k_i = S_i` for every ``i`` (on an input of size
        ``S*N``, where 'valid' and circular coincide; this includes a 1x1 convolution at stride 1).

    ``padding="zeros"`` (zero padding of ``P = (k - 1) // 2`` on the left, i.e. PyTorch's ``padding='same'``
    or ``k // 2`` for odd ``k``; Proposition 6):
        At stride 1 an orthogonal kernel has only its centre tap non-zero (Proposition 6), i.e. it is a pure
        1x1 channel mixing embedded in a k x k kernel; a 1x1 orthogonal mixing always exists at stride 1
        (RO: :math:`M \le C`, CO: :math:`M \ge C`, which is the case itself), so ``exists`` is True but the
        reason says that the spatial taps must vanish when ``k > 1``. For strides > 1 (derived by us, checked
        numerically): the same border argument leaves only the taps ``P .. P + S - 1`` (those that never meet
        the padding on a grid of size ``S*N``), i.e. an effective kernel :math:`k'_i = \min(S_i, k_i - P_i)`
        that is then judged as a circular one: RO iff :math:`M \le C \prod_i k'_i`, CO iff :math:`S_i \le k'_i`.

    ``dilation`` (``D``, an int or a tuple; ``padding="circular"`` only; derived by us, checked numerically in the
    tests): tap ``p`` reads the input at ``S i + D p``, so the taps read
    :math:`r_i = \min(k_i, S_i / \gcd(D_i, S_i))` residues modulo :math:`S_i` (``min(k_i, S_i)`` undilated). RO
    exists iff :math:`M \le C \prod_i r_i`, CO iff :math:`r_i = S_i` in every dimension. At stride 1 dilation
    changes nothing.

    Raises :class:`~orthofx.errors.ArgumentError` (a ``ValueError``) when a size is < 1, a tuple has the wrong
    length, the channels are not divisible by ``groups``, ``padding`` is unknown, or ``dilation != 1`` with a
    padding other than ``"circular"`` (not modelled there).

    >>> orthogonal_conv_exists(2, 4, 3, stride=2)          # RO: 4 <= 2 * 3**2
    ExistenceResult(exists=True, case='RO', reason='row-orthogonal case (M=4 <= C*S^d=8): exists iff M <= C*k^d, here 4 <= 18')
    >>> exists, case, reason = orthogonal_conv_exists(64, 128, 1, stride=2)   # ResNet strided shortcut
    >>> exists, case
    (False, 'RO')
    >>> orthogonal_conv_exists(16, 128, 3, stride=2).exists    # CO: S = 2 <= k = 3
    True
    >>> orthogonal_conv_exists(16, 128, 3, stride=2, padding="valid").exists   # Proposition 5
    False
    """
    where = "orthogonal_conv_exists"
    dims = _dims(dims, where)
    C, M, g = _per_group(c_in, c_out, groups, where)
    ks = _sizes(kernel_size, dims, f"{where}: kernel_size", broadcast=False)
    ss = _sizes(stride, dims, f"{where}: stride")
    if not isinstance(padding, str) or padding not in _PADDINGS:  # ('in' on an array compares elementwise)
        raise ArgumentError(f"{where}: padding must be one of {_PADDINGS}, got {padding!r} "
                            "(a torch Conv with padding=0 is 'valid'; padding_mode='zeros' with 'same'-style "
                            "padding is 'zeros')")
    ds = _sizes(dilation, dims, f"{where}: dilation")
    dilated = any(dl != 1 for dl in ds)
    if dilated and padding != "circular":
        raise ArgumentError(f"{where}: dilation={_fmt(ds)} is modelled for padding='circular' only, got "
                            f"padding={padding!r}")
    S = math.prod(ss)
    case = "RO" if M <= C * S else "CO"
    isotropic = len(set(ks)) == 1 and len(set(ss)) == 1
    grp = f"per group of {g} (C={C}, M={M}), " if g > 1 else ""
    if case == "RO":
        head = f"{grp}row-orthogonal case (M={M} <= C*S^d={C * S})"
    else:
        head = f"{grp}column-orthogonal case (M={M} > C*S^d={C * S})"

    def ro_condition(kern: tuple[int, ...], what: str) -> tuple[bool, str]:
        if isotropic and what == "k":
            limit = C * ks[0] ** dims
            ok = M <= limit
            return ok, f"exists iff M <= C*k^d, here {M} {'<=' if ok else '>'} {limit}"
        limit = C * math.prod(min(a, b) for a, b in zip(kern, ss))
        ok = M <= limit
        return ok, (f"exists iff M <= C*prod(min({what}_i, S_i)), "
                    f"here {M} {'<=' if ok else '>'} {limit}")

    def co_condition(kern: tuple[int, ...], what: str) -> tuple[bool, str]:
        ok = all(s <= a for a, s in zip(kern, ss))
        if isotropic and what == "k":
            return ok, f"exists iff S <= k, here {ss[0]} {'<=' if ok else '>'} {kern[0]}"
        return ok, (f"exists iff S_i <= {what}_i in every dimension, "
                    f"here S={_fmt(ss)}, {what}={_fmt(kern)}")

    if padding == "circular" and dilated:
        # taps p * D read the residues {p * D mod S}: min(k, S / gcd(D, S)) of them per dimension
        reads = tuple(min(k, s // math.gcd(dl, s)) for k, s, dl in zip(ks, ss, ds))
        where = f"with dilation D={_fmt(ds)} the taps read r=min(k, S/gcd(D, S))={_fmt(reads)} residues mod S"
        if case == "RO":
            limit = C * math.prod(reads)
            ok = M <= limit
            return ExistenceResult(ok, case, f"{head}: {where}; exists iff M <= C*prod(r_i), "
                                             f"here {M} {'<=' if ok else '>'} {limit}")
        ok = reads == ss
        return ExistenceResult(ok, case, f"{head}: {where}; exists iff r_i = S_i in every dimension, "
                                         f"here r={_fmt(reads)}, S={_fmt(ss)}")

    if padding == "circular":
        ok, cond = (ro_condition if case == "RO" else co_condition)(ks, "k")
        return ExistenceResult(ok, case, f"{head}: {cond}")

    if padding == "valid":
        if case == "RO":
            ok, cond = ro_condition(ks, "k")
            return ExistenceResult(ok, case, f"{head} with 'valid' padding: as with circular padding, {cond}")
        ok = ks == ss
        if ok:
            cond = (f"only non-overlapping windows k = S work (Proposition 5 rules out k > S), "
                    f"here k={_fmt(ks)} = S={_fmt(ss)}")
        elif all(k >= s for k, s in zip(ks, ss)):
            cond = (f"Proposition 5: overlapping windows (k={_fmt(ks)} > S={_fmt(ss)}) leave the border "
                    f"columns short of taps, so only k = S works")
        else:
            cond = f"some input pixels are never read (k={_fmt(ks)} < S={_fmt(ss)} in some dimension)"
        return ExistenceResult(ok, case, f"{head} with 'valid' padding: {cond}")

    # zeros ('same' zero padding)
    pads = tuple((k - 1) // 2 for k in ks)
    keff = tuple(min(s, k - p) for k, s, p in zip(ks, ss, pads))
    if all(s == 1 for s in ss):
        one = "M <= C" if case == "RO" else "M >= C"
        spatial = (f"; with k={_fmt(ks)} > 1 all taps but the centre one must vanish, so it is a pure 1x1 "
                   f"channel mixing" if any(k > 1 for k in ks) else "")
        return ExistenceResult(
            True, case,
            f"{head} with zero 'same' padding (Proposition 6): an orthogonal kernel has only its centre tap "
            f"non-zero, and a 1x1 orthogonal mixing exists iff {one}, here {M} {'<=' if case == 'RO' else '>='} "
            f"{C}{spatial}")
    ok, cond = (ro_condition if case == "RO" else co_condition)(keff, "k'")
    return ExistenceResult(
        ok, case,
        f"{head} with zero 'same' padding: only the taps P..P+S-1 that never meet the border may be non-zero, "
        f"an effective kernel k'=min(S, k-P)={_fmt(keff)}; {cond}")


def theorem8_constants(c_in: int, c_out: int, kernel_size, stride=1, dims: int = 2,
                       groups: int = 1) -> tuple[float, float]:
    r"""Constants of P0 Theorem 8: :math:`\alpha' L_{orth} \le err_s^2 \le \alpha L_{orth}`.

    :math:`err_s` is the spectral norm of :math:`\mathcal{K}\mathcal{K}^T - I` (RO) or
    :math:`\mathcal{K}^T\mathcal{K} - I` (CO) of the circular convolution operator (grid with ``S*N >= 2k - 1``),
    and :math:`L_{orth}` is :func:`orthofx.metrics.lorth`. Returns ``(alpha_lower, alpha_upper)`` with

    .. math::

        \alpha' = \frac{1}{\min(M, C S^d)}, \qquad
        \alpha = \begin{cases} (2\lfloor (k-1)/S \rfloor + 1)^d \, M & \text{RO} \\ (2k - 1)^d \, C & \text{CO}
        \end{cases}

    (P0 writes :math:`S^2` for ``d = 2``). Non-square sizes use the product over dimensions of the
    per-dimension factors. With ``groups`` the operator is block diagonal: :math:`L_{orth}` sums over groups
    and :math:`err_s` is the maximum, so :math:`\alpha'` keeps the total ``M``, ``C`` (it equals
    ``1 / (groups * min(M/g, C/g S^d))``) while :math:`\alpha` uses the per-group ``M/g`` or ``C/g``.

    >>> theorem8_constants(4, 8, 3, stride=1)    # CO: alpha' = 1/4, alpha = 5**2 * 4
    (0.25, 100.0)
    >>> theorem8_constants(8, 4, 3, stride=2)    # RO: alpha' = 1/4, alpha = 3**2 * 4
    (0.25, 36.0)
    """
    where = "theorem8_constants"
    dims = _dims(dims, where)
    C, M, g = _per_group(c_in, c_out, groups, where)
    ks = _sizes(kernel_size, dims, f"{where}: kernel_size", broadcast=False)
    ss = _sizes(stride, dims, f"{where}: stride")
    S = math.prod(ss)
    # int / int rounds correctly (down to 0.0 past float's range); float(int) past it raises OverflowError, so an
    # upper constant beyond float's range is inf, the nearest float above it
    lower = 1 / (g * min(M, C * S))
    if M <= C * S:
        upper = math.prod(2 * ((k - 1) // s) + 1 for k, s in zip(ks, ss)) * M
    else:
        upper = math.prod(2 * k - 1 for k in ks) * C
    try:
        return lower, float(upper)
    except OverflowError:
        return lower, math.inf
