"""Pipeline parallelism: the layers split into consecutive stages over the mesh axis `stage`; the
activations go from stage to stage with `ppermute`; tensor parallelism works inside each stage.

Layout. With L layers over S stages (S <= L), every stage has n = ceil(L/S) places and holds
consecutive layers: stage s holds layers s*n .. s*n + n - 1 when S divides L. Otherwise the last
S - (L mod S) stages hold n - 1 layers and end in a padding place (`stage_layout`): a block of zero
weights, which passes its input through exactly, so any stage count up to L works, at the cost of
the padding places' reads and ticks. The weights are stacked by their place j in the stage:
`weights["stages"][f"layer_{j}"]` has a leading axis of size S (the logical axis `layers`, mapped
onto `stage`) whose entry s is stage s's place j. Inside
`shard_map` a stage reads entry 0 of its own shard: a static index of a length-1 axis, so no weight is
sliced or copied (a scan over stacked layers, which slices them, decoded 2.3x slower on the H200).
Embedding, final norm and LM head are on every stage (split over `tensor` as without stages).

Microbatches. A batch of B rows splits into M microbatches, row i*M + m in microbatch m, so each
microbatch keeps its share of every `data` shard. M = S when B divides into S microbatches over the
`data` shards, else 1 (a single prompt).

Schedules. Stage s skips its layers (`lax.cond`) at a tick where it holds no microbatch.
- `forward` (prefill, scoring, a decode step of one sequence): GPipe. At tick t stage s runs
  microbatch t - s, for M + S - 1 ticks. With M = 1 the stages run in turn.
- `decode_prelude` then `decode_round` (generate's loop when M = S): the pipeline stays full from one
  token to the next. At every tick each stage runs a different microbatch. The microbatch that leaves
  the last stage is sampled, and its next token enters stage 0 at the next tick. A round of S ticks
  gives every row one token, and every stage does useful work at every tick.

KV cache. The cache is one `KVCache` per slot q < M, each leaf `[S, B/M, cache_seq, kv_heads,
head_dim]`, split by stage and by kv heads over `tensor` (`rules.cache_sharding`). Stage s keeps
microbatch m in slot (m + s) mod M. At tick t every stage then uses slot t mod M: a static choice of
array, so no cache rows are sliced out and written back.

Left out: interleaved (virtual) stages and 1F1B, which shorten GPipe's fill and matter for
training; keeping the stages full for a batch that does not split into S
microbatches per `data` shard (it runs the stages in turn).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax.cache import KVCache
from llmjax.config import LlamaConfig

AXIS = "stage"
DATA = "data"
# (stage weights, x [b, T, D], positions [b, T], one slot's cache or None) -> (x, cache)
StageFn = Callable


def stages(mesh) -> int:
    """The number of pipeline stages of `mesh` (1 without a mesh)."""
    return 1 if mesh is None else dict(mesh.shape).get(AXIS, 1)


def microbatch_count(mesh, batch: int) -> int:
    """M: `stages` when `batch` rows split into that many microbatches on every `data` shard, else 1."""
    s = stages(mesh)
    return s if s > 1 and batch % (s * mesh.shape[DATA]) == 0 else 1


def layers_per_stage(config: LlamaConfig, num_stages: int) -> int:
    """Places per stage: ceil(L / S). Stages that hold fewer layers fill the rest with padding."""
    if num_stages > config.num_layers:
        layers = config.num_layers
        fix = f"at most {layers} stages" if layers > 1 else "stage=1 (a model of one layer has no pipeline)"
        raise ValueError(f"stage={num_stages} exceeds the model's {layers} layer{'s' if layers > 1 else ''}; choose {fix}")
    return -(-config.num_layers // num_stages)


def stage_layout(config: LlamaConfig, num_stages: int) -> list[list[int | None]]:
    """`layout[s][j]`: the model layer at place j of stage s, or None for a padding place. The first
    L mod S stages hold ceil(L/S) layers and the others one fewer, each ending in one padding place,
    so every stage holds consecutive layers and at least one (a stage of padding alone would run
    a tick for nothing)."""
    n = layers_per_stage(config, num_stages)
    longer = config.num_layers - (n - 1) * num_stages  # stages that hold n layers
    layout, first = [], 0
    for s in range(num_stages):
        count = n if s < longer else n - 1
        layout.append([first + j if j < count else None for j in range(n)])
        first += count
    return layout


def padding_layer(tree):
    """A padding place's weights: zeros shaped like a layer's `tree` (host arrays for shapes, device
    arrays for traced ones). A block of zero weights adds zero to the residual stream (its attention
    and MLP outputs go through zero `o` and `down` products), so it passes its input through exactly."""
    return jax.tree.map(lambda w: np.zeros(w.shape, w.dtype) if isinstance(w, jax.ShapeDtypeStruct)
                        else jnp.zeros_like(w), tree)


def group_layers(tree: dict, config: LlamaConfig, num_stages: int, combine: Callable) -> dict:
    """`tree` (a per-weight tree of specs or shapes with `layer_{i}` entries, every layer alike) in the
    pipeline layout: the `layer_{i}` entries become `stages/layer_{j}` = `combine([stage 0's place j,
    stage 1's, ...])`; a padding place takes layer 0's entry (the same specs and shapes)."""
    layout = stage_layout(config, num_stages)
    grouped = {key: value for key, value in tree.items() if not key.startswith("layer_")}
    grouped["stages"] = {f"layer_{j}": combine([tree[f"layer_{0 if i is None else i}"] for i in
                                                (places[j] for places in layout)])
                         for j in range(len(layout[0]))}
    return grouped


def on_stage(mesh: jax.sharding.Mesh, stage: int, shardings):
    """`shardings` (a tree of `NamedSharding`s over `mesh`, leading axis over `stage`) for one stage's
    devices alone: arrays `[1, ...]` placed so are that stage's shards of the whole."""
    index = mesh.axis_names.index(AXIS)
    devices = np.take(mesh.devices, [stage], axis=index)
    sub = jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)
    return jax.tree.map(lambda s: NamedSharding(sub, s.spec), shardings)


def run_on_stage(fn: Callable, shardings) -> Callable:
    """`jax.jit(fn, out_shardings=shardings)` with `shardings` from `on_stage`, compiled once however
    often it is called (with arguments of one shape, as each layer's key is). A process with none of the stage's devices gets arrays with no local shards,
    as it would for any array that lives on other hosts' devices."""
    devices = jax.tree.leaves(shardings)[0].mesh.devices.flat
    if any(d.process_index == jax.process_index() for d in devices):
        return jax.jit(fn, out_shardings=shardings)

    shapes = []  # traced once, on the first call: every call's arguments are alike

    def elsewhere(*args):
        if not shapes:
            shapes.append(jax.eval_shape(fn, *args))
        return jax.tree.map(lambda a, s: jax.make_array_from_single_device_arrays(a.shape, s, [], dtype=a.dtype),
                            shapes[0], shardings)
    return elsewhere


def stack_stages(places: dict, shardings: dict) -> dict:
    """`stages/layer_j` weights from each place's own: `places[s, j]` is a tree of arrays `[1, ...]` on
    stage s's devices (`on_stage`), a layer's or padding's (`stage_layout`); `shardings` is the
    stacked layout's. The arrays become shards of the result without a copy, so a model placed a
    layer at a time never sits whole anywhere."""
    per_stage, num_stages = len(shardings), len(places) // len(shardings)

    def stack(sharding, *parts):
        shards = [shard.data for part in parts for shard in part.addressable_shards]
        return jax.make_array_from_single_device_arrays((len(parts),) + parts[0].shape[1:], sharding, shards,
                                                        dtype=parts[0].dtype)

    return {f"layer_{j}": jax.tree.map(stack, shardings[f"layer_{j}"],
                                       *[places[s, j] for s in range(num_stages)])
            for j in range(per_stage)}


def zeros_cache(config: LlamaConfig, mesh, batch: int, length: int, dtype) -> tuple[KVCache, ...]:
    """An empty cache in the pipeline layout: one `KVCache` per slot, leaves `[S, B/M, length, KV, hd]`."""
    s, m = stages(mesh), microbatch_count(mesh, batch)
    per_stage = dataclasses.replace(config, num_layers=layers_per_stage(config, s))
    slot = KVCache.zeros(per_stage, batch // m, length, dtype)
    return tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (s, *a.shape)), slot) for _ in range(m))


# ---------------------------------------------------------------- schedules


def _tick(mesh, stage_fn: StageFn, weights, x, positions, cache, live: tuple[bool, ...]):
    """One tick: stage s runs its layers on x[s] `[b, T, D]` at positions[s] when live[s], reading and
    writing `cache` (one slot, or None). Returns the last stage's output (on every device) and the
    next tick's inputs: each stage's output moved to the next stage; stage 0's is left zero."""
    num_stages = stages(mesh)
    shift = [(s, s + 1) for s in range(num_stages - 1)]

    def body(stage_ids, weights, x, positions, cache):
        # The stage's index from an input split over `stage`, not `axis_index`: its PartitionId
        # is refused by XLA's SPMD partitioner in some programs where `tensor` is left to it (a
        # quantized model's products, three layers a stage, inside generate's loop).
        me = stage_ids[0]
        own = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731  this stage's [1, ...] shard
        w, x, positions, cache = own(weights), x[0], positions[0], own(cache)

        def run(x, cache):
            return stage_fn(w, x, positions, cache)

        if all(live):
            y, cache = run(x, cache)
        else:
            y, cache = jax.lax.cond(jnp.asarray(live)[me], run, lambda x, cache: (x, cache), x, cache)
        last = _from_last_stage(y, me, num_stages)
        moved = _ppermute_with_positions(y, positions, shift)
        return (last, *(a[None] for a in moved), jax.tree.map(lambda a: a[None], cache))

    # `data` is manual too: each data shard's rows go through the stages on their own. (Left to
    # GSPMD, a cache write inside the map crashed XLA's partitioner on jax 0.10.2 with data and
    # tensor both > 1.) `tensor` stays automatic: GSPMD splits each stage's layers by the rules.
    # check_vma=False: jax cannot see that the last stage's output, sent to every stage, is the same
    # on all of them, which out_specs P(rows) states.
    rows = _row_axis(mesh, x.shape[1])
    by_stage, by_rows = P(AXIS), P(AXIS, rows)
    return jax.shard_map(body, mesh=mesh, in_specs=(by_stage, by_stage) + (by_rows,) * 3,
                         out_specs=(P(rows),) + (by_rows,) * 3, axis_names={AXIS, DATA}, check_vma=False)(
        jnp.arange(num_stages, dtype=jnp.int32), weights, x, positions, cache)


def _from_last_stage(y: jax.Array, me: jax.Array, num_stages: int) -> jax.Array:
    """The last stage's `y` on every stage: one point-to-point send to each other stage. (Not a psum
    of the other stages' zeros: a bfloat16 psum inside shard_map aborts XLA on CPU, jax 0.10.2.)"""
    last = num_stages - 1
    out = jnp.where(me == last, y, jnp.zeros_like(y))
    for stage in range(last):
        out = out + jax.lax.ppermute(y, AXIS, [(last, stage)])  # zeros on every stage but `stage`
    return out


def _ppermute_with_positions(y: jax.Array, positions: jax.Array, pairs) -> tuple[jax.Array, jax.Array]:
    """`ppermute` of y `[b, T, D]` and its positions `[b, T]` (int32) in one collective: the
    positions' bits travel as extra columns of y. A permute of the positions alone depends on no
    stage's work, and XLA's CPU runtime ran it alongside a stage's `cond`, whose tensor all-reduces
    it does not order with the collectives outside: with a thread pool sized by the devices, 8 CPU
    devices at stage=4 x tensor=2 deadlocked. Sent with y, the positions leave after the stage's work.
    Both travel as unsigned integers of y's width: as bfloat16 on a CPU, a position whose half reads
    as a NaN (65535, say) came back changed."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(y.dtype).itemsize]
    as_bits = lambda a: jax.lax.bitcast_convert_type(a, bits)  # noqa: E731
    both = jnp.concatenate([as_bits(y), as_bits(positions).reshape(*positions.shape, -1)], axis=-1)
    both = jax.lax.ppermute(both, AXIS, pairs)
    moved = both[..., y.shape[-1]:]
    return (jax.lax.bitcast_convert_type(both[..., :y.shape[-1]], y.dtype),
            jax.lax.bitcast_convert_type(moved if moved.shape[-1] > 1 else moved[..., 0], positions.dtype))


def _microbatches(a: jax.Array, m: int) -> jax.Array:
    """`[B, ...]` -> `[B/m, m, ...]`: microbatch k is `[:, k]`."""
    return a.reshape(a.shape[0] // m, m, *a.shape[1:])


def _row_axis(mesh, rows: int) -> str | None:
    """`data` when `rows` split evenly over it (else the rows are copied on every data shard)."""
    return DATA if rows % mesh.shape[DATA] == 0 else None


def _stage_inputs(mesh, x: jax.Array, positions: jax.Array):
    """Zero inputs for every stage, `[S, b, T, D]` and `[S, b, T]`, split over `stage` and `data`."""
    spec = NamedSharding(mesh, P(AXIS, _row_axis(mesh, x.shape[0])))
    on_stages = lambda a: jax.lax.with_sharding_constraint(a, spec)  # noqa: E731
    s = stages(mesh)
    return (on_stages(jnp.zeros((s, *x.shape), x.dtype)),
            on_stages(jnp.zeros((s, *positions.shape), positions.dtype)))


def forward(mesh, stage_fn: StageFn, weights: dict, x: jax.Array, positions: jax.Array,
            cache: tuple[KVCache, ...] | None = None):
    """The layers of every stage on x `[B, T, D]` at positions `[B, T]`, GPipe-scheduled over
    microbatches; returns the last stage's output `[B, T, D]` (on every device) and the cache."""
    num_stages, batch = stages(mesh), x.shape[0]
    m = microbatch_count(mesh, batch)
    xs, ps = _microbatches(x, m), _microbatches(positions, m)
    buffer, at = _stage_inputs(mesh, xs[:, 0], ps[:, 0])
    slots = None if cache is None else list(cache)
    outputs = []
    for t in range(m + num_stages - 1):
        if t < m:
            buffer, at = buffer.at[0].set(xs[:, t]), at.at[0].set(ps[:, t])
        live = tuple(0 <= t - s < m for s in range(num_stages))
        slot = None if cache is None else slots[t % m]
        out, buffer, at, slot = _tick(mesh, stage_fn, weights, buffer, at, slot, live)
        if cache is not None:
            slots[t % m] = slot
        if t >= num_stages - 1:
            outputs.append(out)  # microbatch t - (S - 1)
    return jnp.stack(outputs, axis=1).reshape(x.shape), None if cache is None else tuple(slots)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What stays in the pipeline between decode rounds: each stage's next input and the cache."""

    x: jax.Array  # [S, B/S, 1, D]; x[0] is microbatch 0's next token, x[s] microbatch S - s mid-way
    positions: jax.Array  # [S, B/S, 1]
    cache: tuple[KVCache, ...]


def decode_prelude(mesh, stage_fn: StageFn, weights: dict, x: jax.Array, positions: jax.Array,
                   cache: tuple[KVCache, ...]) -> DecodeState:
    """Fills the pipeline with each row's first new token (x `[B, 1, D]` at positions `[B, 1]`): in
    S - 1 ticks microbatches 1 .. S-1 enter stage 0 in turn (microbatch m reaches stage S - m), and
    microbatch 0 waits at stage 0 for the first round."""
    num_stages = stages(mesh)
    xs, ps = _microbatches(x, num_stages), _microbatches(positions, num_stages)
    buffer, at = _stage_inputs(mesh, xs[:, 0], ps[:, 0])
    slots = list(cache)
    for i in range(num_stages - 1):  # tick i - (S - 1): microbatch i + 1 enters; slot i + 1
        buffer, at = buffer.at[0].set(xs[:, i + 1]), at.at[0].set(ps[:, i + 1])
        live = tuple(s <= i for s in range(num_stages))
        _, buffer, at, slots[i + 1] = _tick(mesh, stage_fn, weights, buffer, at, slots[i + 1], live)
    return DecodeState(buffer.at[0].set(xs[:, 0]), at.at[0].set(ps[:, 0]), tuple(slots))


def decode_round(mesh, stage_fn: StageFn, weights: dict, state: DecodeState, leave: Callable, carry):
    """S ticks, after which every microbatch has one more token. At tick k the output of microbatch
    m = (k + 1) mod S leaves the last stage: `leave(carry, m, output [B/S, 1, D])` returns the new
    carry and microbatch m's next input `(x [B/S, 1, D], positions [B/S, 1])` for stage 0."""
    num_stages = stages(mesh)
    buffer, at, slots = state.x, state.positions, list(state.cache)
    for k in range(num_stages):
        out, buffer, at, slots[k] = _tick(mesh, stage_fn, weights, buffer, at, slots[k], (True,) * num_stages)
        carry, x, positions = leave(carry, (k + 1) % num_stages, out)
        buffer, at = buffer.at[0].set(x), at.at[0].set(positions)
    return DecodeState(buffer, at, tuple(slots)), carry
