"""Streaming uncentered second moment of a layer's keys, C = K K^T / n.

Sums are kept in float64 (``count``, ``sum`` [C], ``moment`` [C, C], the moment
being the plain sum of outer products; each batch's product is one matmul in the
keys' precision, see ``SecondMoment.update``), so statistics over disjoint seed ranges
merge by addition: the merge of shards equals the statistic of their union.
Files are safetensors with string metadata: ``format``, ``model_sha256``,
``layer``, ``seeds`` (a spec as read by ``rewriting.seeds.parse_seeds``),
``z_dim``, ``count`` and ``channels``.

A computation stopped between batches (``should_stop``) raises ``Cancelled`` with the
moment of the seeds done so far as its ``state`` (``seeds`` names that prefix, and
``repeats`` the key repeat factor it was summed with); ``compute_second_moment(...,
resume=state)`` goes on from the next seed. Resumed on the same device with the same
batch size, the result is bit for bit the uninterrupted one: the same float32 batch
products, added to the float64 sums in the same order.
"""
import json
import math
from contextlib import closing

import torch
from safetensors import safe_open

from rewriting.checkpoint import write_safetensors
from rewriting.errors import Cancelled, CheckpointError, IncompatibleError
from rewriting.layers import StopForward, Trace, model_device, model_dtype
from rewriting.seeds import format_seeds, latent_batches, parse_seeds

FORMAT = "palimpsest.second_moment/1"


def default_batch_size(device) -> int:
    """Images per forward pass when none is asked for: 256 on CUDA, 64 elsewhere.

    On a GPU a small batch leaves it waiting on kernel launches: on an H100 the forward
    pass to a middle layer of the demo generator took about as long for 64 images as for
    256 (docs/benchmarks.md). On a CPU the pass is compute-bound at any batch, and 64 keeps
    the keys of a large layer in a few hundred MB.
    """
    return 256 if torch.device(device).type == "cuda" else 64


def collapse_repeats(keys):
    """(map, repeats): ``keys`` [N, C, H, W] with each 2x2 block of equal key vectors kept once.

    The first convolution after a nearest-neighbour upsampling (ProGAN and StyleGAN
    blocks, the demo generator's layer3, layer5, ...) sees every key four times, and
    the moment's product is the costly part of a statistic (docs/benchmarks.md).
    Only a map whose blocks are all exactly equal is collapsed, so the sums stay exact;
    ``torch.equal`` stops at the first difference, so a map that does not repeat costs
    little. Repeated 4x4 blocks collapse twice.
    """
    repeats = 1
    while keys.numel() and keys.shape[2] % 2 == 0 and keys.shape[3] % 2 == 0:  # empty maps compare equal
        even_rows = keys[:, :, 0::2]
        if not (torch.equal(even_rows, keys[:, :, 1::2])
                and torch.equal(even_rows[..., 0::2], even_rows[..., 1::2])):
            break
        keys, repeats = even_rows[..., 0::2], repeats * 4
    return keys, repeats


def repeats_hold(keys, repeats):
    """Whether every block of ``repeats`` locations of ``keys`` [N, C, H, W] holds one key.

    A bool tensor on the keys' device: unlike ``collapse_repeats`` it never makes the
    host wait for the device, so ``compute_second_moment`` checks each batch with it
    and reads the verdict once per statistic (and a CUDA graph can replay it).
    """
    side = math.isqrt(repeats)
    n, c, h, w = keys.shape
    if repeats == 1:
        return torch.ones((), dtype=torch.bool, device=keys.device)
    if h % side or w % side:
        return torch.zeros((), dtype=torch.bool, device=keys.device)
    blocks = keys.reshape(n, c, h // side, side, w // side, side)
    return (blocks == blocks[:, :, :, :1, :, :1]).all()


class SecondMoment:
    """Running count, sum and sum of outer products of key vectors (float64)."""

    def __init__(self, channels, device="cpu", metadata=None):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.moment = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        self.metadata = dict(metadata or {})

    @property
    def channels(self):
        return self.sum.shape[0]

    def update(self, keys, repeats=None):
        """Add keys given as rows [M, C] or a feature map [N, C, H, W]: one matmul per batch.

        The batch's product runs on the keys' device in float64 for float64 keys and
        in float32 otherwise (relative error ~1e-6 for ~10^4 keys a batch, below the
        float32 keys' own accuracy and far cheaper on CPUs); the sums are float64.
        A map that repeats each key over 2x2 blocks is added once per block and
        weighted: the same sums for a quarter of the product. ``repeats``: the map's
        repeat factor when the caller has established it (``compute_second_moment``
        checks it with ``repeats_hold``); None: found here by ``collapse_repeats``.
        """
        self.count += self.accumulate(keys, repeats)
        return self

    def accumulate(self, keys, repeats=None):
        """``update``'s device work: adds to ``moment`` and ``sum``, returns the count to add.

        Apart from ``update`` so that a CUDA graph can replay it, the count being added
        on the host (``compute_second_moment``).
        """
        keys = keys.detach()
        channels = keys.shape[1] if keys.dim() == 4 else keys.shape[-1]
        if channels != self.channels:
            raise IncompatibleError(f"keys have {channels} channels, the statistic {self.channels}")
        if keys.dim() != 4:
            repeats = 1
        elif repeats is None:
            keys, repeats = collapse_repeats(keys)
        elif repeats > 1:
            side = math.isqrt(repeats)
            keys = keys[:, :, ::side, ::side]
        dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
        # One column per location plus a row of ones: a single copy, then one GEMM
        # gives both the outer products and (last column) the sums.
        if keys.dim() == 4:
            n, c, h, w = keys.shape
            cols = torch.empty(c + 1, n * h * w, dtype=dtype, device=keys.device)
            cols[:c].view(c, n, h, w).copy_(keys.transpose(0, 1))
        else:
            rows = keys.reshape(-1, channels)
            cols = torch.empty(channels + 1, rows.shape[0], dtype=dtype, device=keys.device)
            cols[:channels].copy_(rows.T)
        cols[channels] = 1
        product = (cols[:channels] @ cols.T).to(device=self.moment.device, dtype=torch.float64)
        if repeats > 1:
            product *= repeats  # a power of two: exact in float64
        self.moment += product[:, :channels]
        self.sum += product[:, channels]
        return cols.shape[1] * repeats

    def merge(self, other):
        """Add another shard in place (same model, layer, channels; disjoint seeds)."""
        if other.channels != self.channels:
            raise IncompatibleError(f"cannot merge {other.channels} channels into {self.channels}")
        # every check before any change: a refused merge leaves self as it was
        inherited = {}
        for field in ("model_sha256", "layer", "z_dim"):
            a, b = self.metadata.get(field), other.metadata.get(field)
            if a is not None and b is not None and a != b:
                raise IncompatibleError(f"cannot merge statistics with different {field}: {a} != {b}")
            if a is None and b is not None:
                inherited[field] = b
        if "seeds" in self.metadata or "seeds" in other.metadata:
            if self.count and "seeds" not in self.metadata or other.count and "seeds" not in other.metadata:
                raise IncompatibleError("cannot merge a statistic with recorded seeds and one without")
            mine = parse_seeds(self.metadata["seeds"]) if "seeds" in self.metadata else []
            theirs = parse_seeds(other.metadata["seeds"]) if "seeds" in other.metadata else []
            if set(mine) & set(theirs):
                raise IncompatibleError("the shards share seeds; merging would count them twice")
            inherited["seeds"] = format_seeds(sorted(mine + theirs))
        self.metadata.update(inherited)
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.moment += other.moment.to(self.moment.device)
        return self

    def __add__(self, other):
        return self.copy().merge(other)

    def copy(self):
        out = SecondMoment(self.channels, self.sum.device, self.metadata)
        out.count = self.count
        out.sum.copy_(self.sum)
        out.moment.copy_(self.moment)
        return out

    def to(self, device):
        out = SecondMoment(self.channels, device, self.metadata)
        out.count = self.count
        out.sum.copy_(self.sum)
        out.moment.copy_(self.moment)
        return out

    @property
    def mean(self):
        """Mean key [C] (float64)."""
        return self.sum / max(self.count, 1)

    @property
    def matrix(self):
        """The uncentered second moment C = sum k k^T / count [C, C] (float64)."""
        if self.count == 0:
            raise IncompatibleError("the statistic is empty")
        return self.moment / self.count

    def save(self, path, metadata=None):
        """Write a safetensors file; ``metadata`` (str -> str) is added to the recorded metadata."""
        meta = {**self.metadata, **(metadata or {})}
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        meta.update(format=FORMAT, count=str(self.count), channels=str(self.channels))
        write_safetensors({"sum": self.sum.cpu().contiguous(), "moment": self.moment.cpu().contiguous()},
                          path, metadata=meta)

    @classmethod
    def load(cls, path, device="cpu"):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sums, moment = f.get_tensor("sum"), f.get_tensor("moment")
        except Exception as e:  # safetensors raises its own error types for bad files
            raise CheckpointError(f"{path}: not a second-moment file ({e})") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        c = sums.shape[0]
        if sums.dtype != torch.float64 or moment.shape != (c, c) or moment.dtype != torch.float64:
            raise CheckpointError(f"{path}: sum/moment tensors have the wrong shape or dtype")
        out = cls(c, device, {k: v for k, v in meta.items() if k not in ("format", "count", "channels")})
        out.count = int(meta["count"])
        out.sum.copy_(sums)
        out.moment.copy_(moment)
        return out


def compute_second_moment(model, layer, seeds, batch_size=None, progress=None, should_stop=None,
                          model_sha256=None, latent_threads=None, graph=None, resume=None):
    """The second moment of ``layer``'s keys over the latents of ``seeds``.

    Each batch runs the model only up to the layer's keys (``Trace(stop="keys")``)
    and adds them with one matmul (see ``SecondMoment.update``). ``batch_size``: images
    per pass (None: ``default_batch_size`` of the model's device). ``progress(done, total)``
    is called after each batch; ``should_stop()`` is polled between batches (raises ``Cancelled``).
    ``latent_threads``: threads drawing latents ahead (``seeds.latent_batches``); by
    default two on CUDA, where one thread's draw (~250,000 seeds/s) bounds a graphed
    statistic (on an H100, layer5 at batch 256: two made it 1.8x as fast as one; four
    and eight no faster), and none on a CPU, whose cores the forward pass already uses.

    Repeated keys (``collapse_repeats``) are looked for in the first batch only, then
    assumed and checked on the device (``repeats_hold``), the verdict read once at the
    end: should a later batch break them, the statistic is counted again without
    collapsing (progress then starts over). ``graph``: on CUDA (the default there),
    each full batch after the first two is one replay of a CUDA graph of the forward
    pass, the check and the update, so the host launches one graph a batch instead of
    a few hundred kernels; a model whose pass cannot be captured runs as it is.

    ``resume``: a ``SecondMoment`` of the first seeds of ``seeds`` (a ``Cancelled``'s
    state, or any statistic of this model and layer over a prefix of them); the
    computation goes on from the seed after them, and ``progress`` counts from there.
    One that does not fit raises ``IncompatibleError``. A stop raises ``Cancelled`` with
    the moment so far as its ``state`` (None when no batch was added, or when the keys'
    repeats broke, so that the moment has to be counted again).
    """
    seeds = parse_seeds(seeds)
    device = model_device(model)
    if batch_size is None:
        batch_size = default_batch_size(device)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError("batch_size must be a positive int")
    if latent_threads is None:
        latent_threads = 2 if device.type == "cuda" else 0
    if graph is None:
        graph = device.type == "cuda"
    meta = {"layer": layer, "seeds": format_seeds(seeds), "z_dim": str(model.z_dim)}
    if model_sha256:
        meta["model_sha256"] = model_sha256
    run = dict(batch_size=batch_size, latent_threads=latent_threads, graph=graph, meta=meta,
               progress=progress, should_stop=should_stop)
    start = None if resume is None else _resume_point(resume, seeds, meta)
    stat, repeats_held = _moment_of_batches(model, layer, seeds, collapse=True, start=start, **run)
    if not repeats_held:
        stat, _ = _moment_of_batches(model, layer, seeds, collapse=False, **run)
    return stat


def _resume_point(resume, seeds, meta):
    """(moment, seeds it covers, repeat factor or None) of ``resume``, checked against the
    computation it is to continue; raises ``IncompatibleError``."""
    if not isinstance(resume, SecondMoment):
        raise IncompatibleError(f"resume must be a SecondMoment, not {type(resume).__name__}")
    for field in ("layer", "z_dim", "model_sha256"):
        mine, theirs = meta.get(field), resume.metadata.get(field)
        if mine is not None and theirs is not None and mine != theirs:
            raise IncompatibleError(f"cannot resume from a statistic of {field} {theirs}: this one is of {mine}")
    if "seeds" not in resume.metadata:
        raise IncompatibleError("cannot resume from a statistic that does not record its seeds")
    done = parse_seeds(resume.metadata["seeds"])
    if done != seeds[:len(done)]:
        raise IncompatibleError(f"cannot resume: the statistic's seeds ({resume.metadata['seeds']}) "
                                f"are not the first of {format_seeds(seeds)}")
    repeats = resume.metadata.get("repeats")
    return resume, len(done), None if repeats is None else int(repeats)


def _partial(stat, held, repeats, done_seeds, meta):
    """The ``Cancelled`` state of a stopped computation: its moment so far, on the CPU, or
    None (nothing added, or repeats assumed that a batch broke)."""
    if stat is None or not bool(held):
        return None
    out = stat.to("cpu")
    out.metadata = {**meta, "seeds": format_seeds(done_seeds), "repeats": str(repeats)}
    return out


def _moment_of_batches(model, layer, seeds, batch_size, latent_threads, graph, meta, progress, should_stop,
                       collapse, start=None):
    """``compute_second_moment``'s loop: (statistic, whether the first batch's repeats held).
    ``start``: (moment, seeds it covers, its repeat factor or None) to go on from."""
    device, dtype = model_device(model), model_dtype(model)
    held = torch.ones((), dtype=torch.bool, device=device)
    stat = repeats = replay = None
    done = 0
    if start is not None:
        begun, done, repeats = start
        stat = begun.to(device)
        stat.metadata = dict(meta)
    batches = latent_batches(seeds[done:], model.z_dim, batch_size, latent_threads)

    def upload(z):
        # On CUDA, pinned memory lets the copy run without waiting for queued GPU work,
        # so taking the next batch's latents overlaps this batch's compute.
        z = z.pin_memory() if device.type == "cuda" else z
        return z.to(device=device, dtype=dtype, non_blocking=True)

    with closing(batches), Trace(model, layer, stop="keys") as tr, torch.no_grad():
        def keys_of(z):
            tr.keys = None
            try:
                model(z)
            except StopForward:  # the pass ends at the keys; the rest of the model never runs
                pass
            if tr.keys is None:
                raise IncompatibleError(f"the forward pass never reached layer {layer!r}")
            return tr.keys

        def add(z):
            """One batch on the device alone (no host wait): keys, repeat check, moment."""
            keys = keys_of(z)
            if repeats > 1:
                held.logical_and_(repeats_hold(keys, repeats))
            return stat.accumulate(keys, repeats)

        for i, z in enumerate(batches):
            if should_stop is not None and should_stop():
                raise Cancelled("statistics cancelled", state=_partial(stat, held, repeats, seeds[:done], meta))
            z = upload(z)
            if repeats is None:  # the first batch (of a fresh computation, or of a resume that did not say)
                keys = keys_of(z)
                if stat is None:
                    stat = SecondMoment(keys.shape[1] if keys.dim() == 4 else keys.shape[-1], device, meta)
                repeats = collapse_repeats(keys)[1] if collapse and keys.dim() == 4 else 1  # one host wait
                stat.count += stat.accumulate(keys, repeats)
            elif replay is not None and len(z) == batch_size:
                stat.count += replay(z)
            elif graph and i == 1 and len(z) == batch_size:
                count, replay = _captured(add, z)
                stat.count += count
            else:
                stat.count += add(z)
            done += len(z)
            if progress is not None:
                progress(done, len(seeds))
    return stat, bool(held)


def _captured(add, z):
    """Run ``add(z)`` as the warm-up of a CUDA graph of it: (its count, replay or None).

    ``replay(z)`` copies a batch of the same shape into the graph's input and replays
    it. The warm-up runs on the capture's stream, as CUDA graphs ask. None when the
    pass cannot be captured (a host wait inside it, say): the caller stays eager.
    """
    static = z.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        count = add(z)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            add(static)
    except Exception:  # capture refuses many things; eager is always correct
        return count, None

    def replay(z):
        static.copy_(z, non_blocking=True)
        graph.replay()
        return count

    return count, replay
