"""Compression of what replicas exchange (gradients or weight deltas), with error feedback.

`sync.compress` names one of `KINDS`; `make_compressor(kind, ratio=None, rank=None, seed=0)` builds
the compressor of one exchanged tensor stream, `ErrorFeedback` keeps one compressor and one residual
per named stream and does the exchange.

A compressor has `compress(t) -> Payload` and `decompress(payload) -> tensor`. `Payload.tensors`
are exactly the tensors that go on the wire; `payload_bytes(payload)` is their byte count, which is
what a strategy counts as sent. The shape, dtype and kind (and the int8 chunk size) are known to
both sides from the model and the recipe and are not counted.

| kind     | payload (for n elements, input dtype of s bytes)                  | bytes                        |
|----------|-------------------------------------------------------------------|------------------------------|
| none     | the tensor                                                        | s n                          |
| fp16     | float16 cast (clamped to +-65504, the excess stays in the residual)| 2 n                         |
| bf16     | bfloat16 cast                                                     | 2 n                          |
| int8     | int8 codes, symmetric absmax scale per chunk of `INT8_CHUNK` flat | n + 4 ceil(n / chunk)        |
|          | elements (fp32 scales), round to nearest                          |                              |
| topk     | the k = max(1, round(ratio n)) largest abs values (input dtype)   | k (s + 4)                    |
|          | and their flat indices as int32 (int64 only past 2**31 - 1        | (k (s + 8) past 2**31 - 1)   |
|          | elements: int32 halves the index bytes for every real tensor)     |                              |
| powersgd | P [m, r] and Q [n', r] of a rank-r approximation of the tensor    | r (m + n') s                 |
|          | viewed as [m = shape[0], n' = numel / m]; 0-d and 1-d tensors and |                              |
|          | matrices where r (m + n') >= m n' are sent uncompressed (dense)   |                              |

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): to send g on a stream with residual e,
compress m = g + e, send c = C(m), and keep e' = m - D(c). Hence sent + e' == g + e exactly (up to
one rounding of the subtraction), and the sum of everything sent over steps equals the sum of the
gradients minus the current residual.

PowerSGD (Vogels et al. 2019, algorithm 1 with 2): one power iteration per call, warm-started from
the previous call's Q. Between replicas P and Q are all-reduced (`powersgd_step(M, Q,
all_reduce_fn)`): P = sum_i M_i Q, P_hat = orthogonalise(P) (Householder QR), Q = sum_i M_i^T P_hat;
the aggregate P_hat Q^T is the sum over replicas of the local approximations P_hat (M_i^T P_hat)^T,
and each replica's error-feedback residual is M_i minus its own local approximation (as in the
paper; torch's DDP hook instead subtracts the averaged one). On a matrix of rank <= r one call is
exact whenever M Q has rank r (almost surely for the random initial Q and for the warm start), so
exactness needs one power iteration; on other matrices successive calls on the same matrix converge
to the best rank-r approximation like subspace iteration.

Replicas must share `seed`: PowerSGD's initial Q of a stream is drawn from it (and the stream name),
and the all-reduced P and Q are only meaningful if every replica started from the same Q.

`all_reduce_fn(t) -> sum over replicas` (it may work in place on its argument, which is always a
fresh tensor; `torch_all_reduce(group)` wraps torch.distributed). `all_gather_fn(t) -> [t_0, ...,
t_{W-1}]` in replica order (`torch_all_gather(group)`). int8 and topk payloads cannot be summed on
the wire (per-replica scales, different indices), so they are all-gathered and decompressed; none,
fp16, bf16 and powersgd are all-reduced when an `all_reduce_fn` is given.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

KINDS = ("none", "fp16", "bf16", "int8", "topk", "powersgd")
DEFAULT_RATIO = 0.01  # topk: fraction of entries kept
DEFAULT_RANK = 4  # powersgd: rank of the approximation
INT8_CHUNK = 256  # int8: flat elements per fp32 scale
FP16_MAX = 65504.0
_INT32_MAX = 2**31 - 1

AllReduceFn = Callable[[Tensor], Tensor]
AllGatherFn = Callable[[Tensor], Sequence[Tensor]]

__all__ = [
    "KINDS",
    "Payload",
    "Compressor",
    "NoCompression",
    "CastCompressor",
    "Int8Compressor",
    "TopKCompressor",
    "PowerSGDCompressor",
    "PowerSGDStep",
    "ErrorFeedback",
    "make_compressor",
    "decompress",
    "payload_bytes",
    "orthogonalise",
    "powersgd_step",
    "torch_all_reduce",
    "torch_all_gather",
]


# ------------------------------------------------------------------------------------- payload


@dataclass
class Payload:
    """What one replica sends for one tensor: `tensors` go on the wire, the rest is known to both sides."""

    kind: str
    tensors: dict[str, Tensor]
    shape: torch.Size
    dtype: torch.dtype
    chunk: int = 0  # int8 only

    @property
    def nbytes(self) -> int:
        return payload_bytes(self)


def payload_bytes(payload: Payload | Tensor | dict[str, Tensor] | Iterable[Tensor]) -> int:
    """Bytes on the wire: the sum of numel * element_size over the payload's tensors."""
    if isinstance(payload, Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, Payload):
        payload = payload.tensors
    if isinstance(payload, dict):
        payload = payload.values()
    return sum(payload_bytes(t) for t in payload)


def decompress(payload: Payload) -> Tensor:
    """The tensor a payload stands for (any kind; decompression needs no compressor state)."""
    t = payload.tensors
    if payload.kind in ("none", "fp16", "bf16") or (payload.kind == "powersgd" and "values" in t):
        # (powersgd sends 0-d, 1-d and small tensors dense)
        return t["values"].to(payload.dtype).reshape(payload.shape)
    if payload.kind == "int8":
        q, scale = t["q"], t["scale"]
        work = _work_dtype(payload.dtype)
        n = q.numel()
        per = scale.to(work).repeat_interleave(payload.chunk)[:n]
        return (q.to(work) * per).to(payload.dtype).reshape(payload.shape)
    if payload.kind == "topk":
        n = math.prod(payload.shape)
        out = torch.zeros(n, dtype=payload.dtype, device=t["values"].device)
        out[t["indices"].long()] = t["values"].to(payload.dtype)
        return out.reshape(payload.shape)
    if payload.kind == "powersgd":
        return (t["p"] @ t["q"].T).to(payload.dtype).reshape(payload.shape)
    raise ValueError(f"unknown payload kind {payload.kind!r}; expected one of {', '.join(KINDS)}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Arithmetic (scales, residuals) in at least float32, float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------- compressors


class Compressor:
    """One exchanged tensor stream. Subclasses set `kind` and implement `compress`."""

    kind: str = ""
    # Payloads of all replicas can be summed element-wise on the wire (an all-reduce), and the sum
    # decompresses to the sum of what each replica sent (up to the wire dtype's rounding).
    all_reducible: bool = False

    def compress(self, t: Tensor) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload) -> Tensor:
        return decompress(payload)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _payload(self, t: Tensor, tensors: dict[str, Tensor], **kw) -> Payload:
        return Payload(self.kind, tensors, t.shape, t.dtype, **kw)


class NoCompression(Compressor):
    kind = "none"
    all_reducible = True

    def compress(self, t: Tensor) -> Payload:
        return self._payload(t, {"values": t.detach()})


class CastCompressor(Compressor):
    """fp16 (values clamped to the finite fp16 range so nothing becomes inf) or bf16."""

    all_reducible = True

    def __init__(self, dtype: torch.dtype = torch.float16):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"CastCompressor casts to float16 or bfloat16, not {dtype}")
        self.dtype = dtype
        self.kind = "fp16" if dtype == torch.float16 else "bf16"

    def compress(self, t: Tensor) -> Payload:
        x = t.detach()
        if self.dtype == torch.float16:
            x = x.clamp(-FP16_MAX, FP16_MAX)
        return self._payload(t, {"values": x.to(self.dtype)})


class Int8Compressor(Compressor):
    """Symmetric int8 with one fp32 absmax scale per chunk of `chunk` consecutive flat elements.

    scale = absmax / 127 (rounded up to the next fp32 if fp32 rounding made it smaller, so that no
    code exceeds 127), code = round(x / scale) in [-127, 127]: |x - code * scale| <= scale / 2.
    Non-finite values are not supported (an inf makes its chunk's scale inf).
    """

    kind = "int8"

    def __init__(self, chunk: int = INT8_CHUNK):
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"int8 chunk must be an integer >= 1 (elements per scale); got {chunk!r}")
        self.chunk = chunk

    def compress(self, t: Tensor) -> Payload:
        work = _work_dtype(t.dtype)
        flat = t.detach().reshape(-1).to(work)
        n, c = flat.numel(), self.chunk
        nchunks = -(-n // c)
        padded = flat.new_zeros(nchunks * c)
        padded[:n] = flat.abs()
        absmax = padded.view(nchunks, c).amax(dim=1)
        scale = (absmax / 127).to(torch.float32)
        low = scale.to(work) * 127 < absmax
        if bool(low.any()):
            scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
        per = scale.to(work).repeat_interleave(c)[:n]
        safe = torch.where(per > 0, per, torch.ones_like(per))
        q = torch.round(flat / safe).clamp_(-127, 127).to(torch.int8)
        return self._payload(t, {"q": q, "scale": scale}, chunk=c)


class TopKCompressor(Compressor):
    """The k = max(1, round(ratio * numel)) entries of largest magnitude, with their flat indices.

    Values keep the input dtype; indices are int32 (int64 only for tensors past 2**31 - 1 elements).
    """

    kind = "topk"

    def __init__(self, ratio: float = DEFAULT_RATIO):
        self.ratio = _check_ratio(ratio)

    def k(self, numel: int) -> int:
        return min(numel, max(1, round(self.ratio * numel))) if numel else 0

    def compress(self, t: Tensor) -> Payload:
        flat = t.detach().reshape(-1)
        n = flat.numel()
        idx = flat.abs().topk(self.k(n), sorted=False).indices
        index_dtype = torch.int32 if n <= _INT32_MAX else torch.int64
        return self._payload(t, {"values": flat[idx], "indices": idx.to(index_dtype)})


class PowerSGDCompressor(Compressor):
    """Rank-r PowerSGD of one stream: one power iteration per call, Q warm-started between calls.

    The tensor is viewed as [shape[0], numel / shape[0]]; see `matrix_shape` for what is sent dense.
    P and Q are sent in the input dtype.
    """

    kind = "powersgd"
    all_reducible = True  # through `reduce` (two all-reduces), not by summing one payload

    def __init__(self, rank: int = DEFAULT_RANK, seed: int = 0):
        self.rank = _check_rank(rank)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.q: Tensor | None = None

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int] | None:
        """(m, n, r) of the matrix view, or None when the tensor is sent uncompressed.

        Dense: 0-d and 1-d tensors (a vector as [numel, 1] would cost r (numel + 1) >= numel), and
        any matrix where r (m + n) >= m n, r = min(rank, m, n), i.e. where the factors are no smaller.
        """
        if len(shape) < 2:
            return None
        m = int(shape[0])
        n = math.prod(int(s) for s in shape[1:])
        r = min(self.rank, m, n)
        if r == 0 or r * (m + n) >= m * n:
            return None
        return m, n, r

    def warm_q(self, n: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The Q to start this call's power iteration from: the last call's, else a seeded draw.

        Columns that are exactly zero or not finite (a zero gradient leaves Q = M^T P_hat = 0, which
        would stay zero forever) are drawn afresh; the decision depends only on Q, which is the same
        on every replica in the all-reduced path, so replicas stay in step.
        """
        q = self.q
        if q is None or q.shape != (n, r):
            q = torch.randn(n, r, generator=self.generator, dtype=torch.float64)
        bad = ~torch.isfinite(q).all(dim=0) | (q == 0).all(dim=0)
        if bool(bad.any()):
            fresh = torch.randn(n, r, generator=self.generator, dtype=torch.float64)
            q = torch.where(bad.to(q.device), fresh.to(q.device, q.dtype), q)
        return q.to(device=device, dtype=dtype)

    def compress(self, t: Tensor) -> Payload:
        """Local (single-replica) compression: payload P_hat [m, r] and Q = M^T P_hat [n, r]."""
        plan = self.matrix_shape(t.shape)
        if plan is None:
            return self._payload(t, {"values": t.detach()})
        m, n, r = plan
        step = powersgd_step(t.detach().reshape(m, n), self.warm_q(n, r, t.dtype, t.device))
        self.q = step.q
        return self._payload(t, {"p": step.p, "q": step.q})

    def reduce(self, t: Tensor, all_reduce_fn: AllReduceFn) -> tuple[Tensor, Tensor, int]:
        """Between replicas: (aggregate = sum of all replicas' local approximations, this replica's
        local approximation (what error feedback counts as sent), bytes this replica put on the wire).
        """
        plan = self.matrix_shape(t.shape)
        if plan is None:
            x = t.detach()
            return all_reduce_fn(x.clone()).reshape(t.shape), x, payload_bytes(x)
        m, n, r = plan
        step = powersgd_step(t.detach().reshape(m, n), self.warm_q(n, r, t.dtype, t.device), all_reduce_fn)
        self.q = step.q
        return (
            step.aggregate().reshape(t.shape),
            step.local().reshape(t.shape),
            payload_bytes([step.p, step.q_local]),
        )

    def state_dict(self) -> dict:
        return {"q": self.q, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.q = state["q"]
        self.generator.set_state(state["rng"])


# ------------------------------------------------------------------------------------- powersgd


def orthogonalise(p: Tensor) -> Tensor:
    """Orthonormal columns spanning p's columns: the Q factor of a Householder QR.

    Householder QR is backward stable and returns orthonormal columns even when p is rank deficient
    (classical Gram-Schmidt loses orthogonality, and divides by zero on a zero column). float16 and
    bfloat16 are factored in float32.
    """
    work = _work_dtype(p.dtype)
    return torch.linalg.qr(p.to(work), mode="reduced").Q.to(p.dtype)


@dataclass
class PowerSGDStep:
    """One PowerSGD power iteration over the replicas (a single replica when no all-reduce)."""

    p: Tensor  # [m, r] orthonormal, the same on every replica
    q: Tensor  # [n, r] sum over replicas of M_i^T p: the same on every replica, next call's warm start
    q_local: Tensor  # [n, r] this replica's M^T p

    def aggregate(self) -> Tensor:
        """p q^T = sum over replicas of the local approximations p q_local^T."""
        return self.p @ self.q.T

    def local(self) -> Tensor:
        """This replica's approximation p p^T M."""
        return self.p @ self.q_local.T


def powersgd_step(m: Tensor, q: Tensor, all_reduce_fn: AllReduceFn | None = None) -> PowerSGDStep:
    """Two-phase PowerSGD on the matrix m [rows, cols] from the warm start q [cols, r].

    Phase 1: P = all_reduce(m q), P_hat = orthogonalise(P). Phase 2: Q = all_reduce(m^T P_hat).
    `all_reduce_fn(t)` returns the sum of t over the replicas (None: one replica, no exchange). Every
    replica must call it with the same q. Bytes sent per replica: (rows + cols) r elements.
    """
    if m.dim() != 2 or q.dim() != 2 or q.shape[0] != m.shape[1]:
        raise ValueError(
            f"powersgd_step needs m [rows, cols] and q [cols, r]; got {tuple(m.shape)}, {tuple(q.shape)}"
        )
    p = m @ q
    if all_reduce_fn is not None:
        p = all_reduce_fn(p)
    p = orthogonalise(p)
    q_local = m.T @ p
    q_sum = all_reduce_fn(q_local.clone()) if all_reduce_fn is not None else q_local
    return PowerSGDStep(p=p, q=q_sum, q_local=q_local)


# ------------------------------------------------------------------------------------- factory


def _check_ratio(ratio) -> float:
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0 < ratio <= 1
    if not ok:
        raise ValueError(
            f"topk ratio must be a number in (0, 1], the fraction of entries kept (e.g. 0.01); got {ratio!r}"
        )
    return float(ratio)


def _check_rank(rank) -> int:
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
        raise ValueError(
            f"powersgd rank must be an integer >= 1, the rank of the approximation (e.g. 4); got {rank!r}"
        )
    return int(rank)


def make_compressor(
    kind: str | None, ratio: float | None = None, rank: int | None = None, seed: int = 0
) -> Compressor:
    """The compressor for `sync.compress: kind` (one of KINDS; None means "none").

    `ratio` applies only to topk (default DEFAULT_RATIO), `rank` only to powersgd (default
    DEFAULT_RANK); passing either to another kind is an error rather than silently ignored.
    `seed` draws PowerSGD's initial Q and must be the same on every replica.
    """
    if kind is None:
        kind = "none"
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise ValueError(f"sync.compress must be one of {', '.join(KINDS)}; got {kind!r}")
    kind = kind.lower()
    if ratio is not None and kind != "topk":
        raise ValueError(
            f"ratio applies only to sync.compress: topk (fraction of entries kept); got ratio={ratio!r} with {kind!r}"
        )
    if rank is not None and kind != "powersgd":
        raise ValueError(f"rank applies only to sync.compress: powersgd; got rank={rank!r} with {kind!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if kind == "none":
        return NoCompression()
    if kind == "fp16":
        return CastCompressor(torch.float16)
    if kind == "bf16":
        return CastCompressor(torch.bfloat16)
    if kind == "int8":
        return Int8Compressor()
    if kind == "topk":
        return TopKCompressor(DEFAULT_RATIO if ratio is None else ratio)
    return PowerSGDCompressor(DEFAULT_RANK if rank is None else rank, seed=int(seed))


def stream_seed(seed: int, name: str) -> int:
    """The seed of stream `name`: the same on every replica and every run (crc32, not hash())."""
    return (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**63


# ------------------------------------------------------------------------------ error feedback


@dataclass
class ErrorFeedback:
    """Compression with error feedback over named streams (one compressor, one residual each).

    Residuals are kept in the gradient's dtype promoted to at least float32. With kind "none"
    nothing is owed and no residual is stored (`residual(name)` is None).
    """

    kind: str | None = "none"
    ratio: float | None = None
    rank: int | None = None
    seed: int = 0
    compressors: dict[str, Compressor] = field(default_factory=dict, init=False)
    residuals: dict[str, Tensor] = field(default_factory=dict, init=False)
    bytes_sent: int = field(default=0, init=False)  # payload bytes this replica put on the wire

    def __post_init__(self):
        self.kind = make_compressor(self.kind, self.ratio, self.rank, self.seed).kind  # validates

    def compressor(self, name: str) -> Compressor:
        c = self.compressors.get(name)
        if c is None:
            c = make_compressor(self.kind, self.ratio, self.rank, stream_seed(self.seed, name))
            self.compressors[name] = c
        return c

    def residual(self, name: str) -> Tensor | None:
        return self.residuals.get(name)

    def _corrected(self, name: str, g: Tensor) -> Tensor:
        m = g.detach().to(_work_dtype(g.dtype))
        r = self.residuals.get(name)
        if r is not None:
            if r.shape != m.shape:
                raise ValueError(
                    f"stream {name!r} changed shape: residual {tuple(r.shape)}, gradient {tuple(m.shape)}"
                )
            m = m + r
        return m

    def _keep(self, name: str, m: Tensor, sent: Tensor) -> None:
        if self.kind != "none":
            self.residuals[name] = m - sent

    def step(self, name: str, g: Tensor) -> tuple[Payload, Tensor]:
        """Compress g + residual locally: (payload to send, the tensor it decompresses to)."""
        m = self._corrected(name, g)
        c = self.compressor(name)
        payload = c.compress(m)
        sent = c.decompress(payload)
        self._keep(name, m, sent)
        self.bytes_sent += payload_bytes(payload)
        return payload, sent

    def exchange(
        self,
        name: str,
        g: Tensor,
        *,
        all_reduce_fn: AllReduceFn | None = None,
        all_gather_fn: AllGatherFn | None = None,
    ) -> Tensor:
        """The sum over replicas of what each sent for stream `name` (divide by W for the mean).

        powersgd needs `all_reduce_fn` (P then Q); int8 and topk need `all_gather_fn`; none, fp16
        and bf16 use `all_reduce_fn` if given (the sum is then formed in the wire dtype), else
        `all_gather_fn`. Every replica must call this for the same streams in the same order.
        """
        c = self.compressor(name)
        m = self._corrected(name, g)
        if isinstance(c, PowerSGDCompressor):
            if all_reduce_fn is None:
                raise ValueError(
                    "sync.compress: powersgd exchanges P and Q by all-reduce; pass all_reduce_fn"
                )
            total, sent, nbytes = c.reduce(m, all_reduce_fn)
        else:
            payload = c.compress(m)
            sent = c.decompress(payload)
            nbytes = payload_bytes(payload)
            if c.all_reducible and all_reduce_fn is not None:
                ((key, wire),) = payload.tensors.items()
                total = decompress(replace(payload, tensors={key: all_reduce_fn(wire.clone())}))
            elif all_gather_fn is not None:
                gathered = {k: list(all_gather_fn(v)) for k, v in payload.tensors.items()}
                world = len(next(iter(gathered.values())))
                parts = [
                    decompress(replace(payload, tensors={k: v[i] for k, v in gathered.items()}))
                    for i in range(world)
                ]
                total = torch.stack(parts).sum(dim=0)
            else:
                need = (
                    "all_reduce_fn or all_gather_fn"
                    if c.all_reducible
                    else "all_gather_fn (payloads cannot be summed on the wire)"
                )
                raise ValueError(f"sync.compress: {self.kind} needs {need}")
        self._keep(name, m, sent)
        self.bytes_sent += nbytes
        return total

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "residuals": dict(self.residuals),
            "compressors": {k: c.state_dict() for k, c in self.compressors.items()},
            "bytes_sent": self.bytes_sent,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"error-feedback state is for sync.compress: {state['kind']}, not {self.kind}")
        self.residuals = dict(state["residuals"])
        self.compressors = {}
        for name, s in state["compressors"].items():
            self.compressor(name).load_state_dict(s)
        self.bytes_sent = int(state["bytes_sent"])


# ------------------------------------------------------------------------- torch.distributed


def torch_all_reduce(group=None) -> AllReduceFn:
    """An `all_reduce_fn` over a torch.distributed group (sum, in place on the fresh argument)."""
    import torch.distributed as dist

    def fn(t: Tensor) -> Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=group)
        return t

    return fn


def torch_all_gather(group=None) -> AllGatherFn:
    """An `all_gather_fn` over a torch.distributed group (every replica's tensor, in rank order)."""
    import torch.distributed as dist

    def fn(t: Tensor) -> list[Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return out

    return fn
