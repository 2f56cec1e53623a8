"""Causal prefill attention on Hopper (sm_90) as a Mosaic GPU Pallas kernel: `flash_attention`'s twin.

Same arguments, same result as `llmjax.kernels.flash_attention` (its module doc defines them; its
`flash_attention_reference` is this kernel's reference too): q `[B, T, H, D]`, k and v `[B, S, KV, D]`
(grouped-query), per-row query offsets and key lengths, scale `1/sqrt(D)`, zeros for a query that
sees no key. bf16 or float16, head dim 64 or 128. NVIDIA Hopper only: the Triton kernel stays the
path on every other GPU (AMD included), and `attend` there picks this one only on an sm_90 device.

Why a second kernel: the Triton kernel reaches 0.7-0.85x cuDNN's prefill speed on the H200 and no
tuning closes that (BENCHMARKS.md, seventh session). Hopper's fast path needs what Triton does not
give us: the tensor memory accelerator (TMA) copying K/V tiles into shared memory while the math
runs, warpgroup matrix products (wgmma) reading their operands from shared memory, and warp
specialization.

How it runs (FlashAttention-3's scheme). The work is split into items, one per (query head, row,
block of `2 * block_q` queries), ordered longest first (the last query blocks see the most keys) with
the query heads that share a kv head side by side, so that their K/V tiles come from L2. In long rows
(`LONG_CHUNKS`) the items go by kv head within chunks of query blocks, so that the programs running at
once read one or two kv heads' keys and values, which L2 holds, not all of them (`_order`). One program
per SM takes items in turn (a snake over the ordered items, which evens out the programs' shares);
three warpgroups per program. Warpgroup 2 is the producer: it issues the TMA copies of the K and V
blocks into a ring of `stages` shared-memory slots, refilling a slot's K (V) half once both consumers
have released that half (K after the scores, V after the product), and runs on into the next item's
blocks while the consumers finish the current one.
Warpgroups 0 and 1 are consumers, each owning `block_q` of an item's queries: scores by wgmma, an
online softmax in registers (base 2, float32), then `p @ V` by wgmma into the output accumulator.
The two consumers take turns on the tensor cores through a shared barrier, so that one's softmax
overlaps the other's products. Key blocks every query of a consumer sees in full run unmasked; the
few on the diagonal or at the row's length edge are masked; blocks no query of the item sees are
neither read nor computed, and a consumer's last block is multiplied by halves when its second half
lies past all the consumer's queries (the first consumer's diagonal block). A consumer that ends before its partner (the diagonal) still waits for
and releases the slots the producer fills for the partner. Each consumer's queries alternate between
two shared-memory buffers: the next item's are copied in while the current one runs, and the
current one's output leaves through the buffer its queries came in.

`interpret=True` runs it in Mosaic GPU's interpret mode on a CPU (the tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llmjax.kernels import dispatch
from llmjax.kernels.flash_attention import LOG2E, MASKED, _check

HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_BYTES = 227 * 1024  # shared memory one program may take on an H100/H200 (less a little for barriers)
# Rows of at least `rows` queries take their items by kv head in chunks of `chunk` query blocks
# (`_order`; the first pair a row meets). On the H200 (BENCHMARKS.md, thirteenth and fourteenth
# sessions), against every head of a block together: 64k x 1 +7% with chunks of 32 (0.95x cuDNN
# before, 1.02x after; 24: 1.1% behind 32); 32k x 1 +1.6-3.1%, 24 ahead of 32 by 0.3-0.8% in three
# calls; 16k x 2 with 24: +2.3%, +2.5% and -1.3% in three calls (16 and 32 level or behind, 48 +1.4%);
# 8k x 2 -5% with any chunk, so shorter rows keep the order.
LONG_CHUNKS = ((65536, 32), (16384, 24))  # (rows, chunk)


def default_chunk(rows: int) -> int:
    """The chunk `flash_attention` takes for rows of `rows` queries when none is given (0: no chunks)."""
    return next((chunk for least, chunk in LONG_CHUNKS if rows >= least), 0)


def supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether this kernel takes these operands (head dim 64 or 128; one dtype, bf16 or float16)."""
    return (q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES and q.dtype == k.dtype == v.dtype)


def chosen(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `flash_attention.attend` runs this kernel on cuda: on a Hopper GPU, for operands it takes,
    with a CUDA whose ptxas compiles it correctly, unless `LLMJAX_ATTENTION_MOSAIC=off` (the Triton
    kernel then; for comparisons)."""
    return (dispatch.mode("LLMJAX_ATTENTION_MOSAIC", dispatch.SETTINGS["LLMJAX_ATTENTION_MOSAIC"]) == "auto" and on_hopper() and supported(q, k, v)
            and not miscompiling_cuda())


def miscompiling_cuda() -> bool:
    """Whether the CUDA runtime is 12.8.0 up to (not including) 12.9.1, whose ptxas JAX's own Mosaic GPU
    attention refuses for causal masks (a miscompilation); this kernel masks the same way."""
    try:
        from jax._src.lib import cuda_versions
        version = cuda_versions.cuda_runtime_get_version()
    except Exception:  # noqa: BLE001 - no CUDA plugin, or a jax without the module: nothing known to avoid
        return False
    return 12080 <= version < 12091


def on_hopper() -> bool:
    """Whether the default device is an NVIDIA GPU of compute capability 9.0 (H100, H200, GH200)."""
    return dispatch.compute_capability() == "9.0"


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "stages", "programs", "chunk", "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offsets: jax.Array, kv_lengths: jax.Array,
                    *, block_q: int = 64, block_kv: int = 128, stages: int = 2,
                    programs: int | None = None, chunk: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention with the Mosaic GPU kernel (arguments as `flash_attention`'s).

    `block_q` queries per consumer warpgroup (a multiple of 64: one wgmma's rows), `block_kv` keys per
    step (a multiple of 64), `stages` K/V slots in shared memory, `programs` programs launched (None:
    one per SM, each taking the work items in turn; 0: one per item). `chunk` > 0 orders the items by kv
    head within chunks of at most `chunk` query blocks (see `_order`); 0 keeps every head of a query
    block together; None: `default_chunk(rows)` (`LONG_CHUNKS`). `interpret=True`
    runs Mosaic GPU's interpret mode (threads, barriers and TMA copies emulated on the CPU) with the two products as
    `jnp.dot`s: that interpreter's wgmma takes neither a transposed operand nor one in registers."""
    _check(q, k, v, q_offsets, kv_lengths)
    if not supported(q, k, v):
        raise ValueError(f"flash_attention_mgpu takes bf16 or float16 q, k, v of one dtype and head dim "
                         f"64 or 128; got {q.dtype}, {k.dtype}, {v.dtype} and {q.shape[-1]}")
    if chunk is None:
        chunk = default_chunk(q.shape[1])
    if chunk < 0:
        raise ValueError(f"flash_attention_mgpu needs chunk >= 0 (0: no chunks), got {chunk}")
    if block_q % 64 or block_kv % 64 or stages < 2:
        raise ValueError(f"flash_attention_mgpu needs block_q and block_kv multiples of 64 and stages >= 2; "
                         f"got {block_q}, {block_kv}, {stages}")
    b, t, h, d = q.shape
    s, n_kv = k.shape[1], k.shape[2]
    smem = (2 * 2 * block_q + 2 * stages * block_kv) * d * q.dtype.itemsize  # q buffers, K/V slots
    if smem > SMEM_BYTES:
        raise ValueError(f"flash_attention_mgpu: block_q={block_q}, block_kv={block_kv}, stages={stages} at "
                         f"head dim {d} need {smem} bytes of shared memory, past the {SMEM_BYTES} a "
                         "Hopper program has; take fewer stages or smaller blocks")
    # The TMA copies move whole blocks: pad queries to the program's 2 * block_q and keys to block_kv.
    # The padding keys lie past every row's length (clamped to S below), so no query sees them.
    t_pad, s_pad = -t % (2 * block_q), -s % block_kv
    if t_pad:
        q = jnp.pad(q, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    if s_pad:
        k, v = (jnp.pad(x, ((0, 0), (0, s_pad), (0, 0), (0, 0))) for x in (k, v))
    offsets = q_offsets.astype(jnp.int32)
    lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, s)
    out = _launch(offsets, lengths, q, k, v, groups=h // n_kv, block_q=block_q, block_kv=block_kv,
                  stages=stages, programs=programs, chunk=chunk, interpret=interpret)
    return out[:, :t]


def _steps(offset, length, first_query, block_q: int, block_kv: int):
    """For queries [first_query, first_query + block_q) of a row: how many key blocks every query sees
    in full (`full`), how many some query sees (`end` >= `full`), and how many keys some query sees
    (`seen`: keys [0, seen))."""
    seen = jnp.maximum(jnp.minimum(length, offset + first_query + block_q), 0)
    end = jax.lax.div(seen + block_kv - 1, block_kv)
    full = jax.lax.div(jnp.maximum(jnp.minimum(length, offset + first_query + 1), 0), block_kv)
    return jnp.minimum(full, end), end, seen


def _order(h: int, b: int, tiles: int, groups: int, chunk: int):
    """Work item `i` -> (query head, row, query block), the longest query blocks first.

    chunk == 0: the heads vary fastest, then the rows, then the blocks: the items running at once are
    every head of a few query blocks, and so read every kv head's keys and values at once.
    chunk > 0: the query blocks are taken in chunks of `chunk` (the last, of the shortest blocks, may
    be shorter); within a chunk the items go by row, then kv head, then block, the query heads that
    share a kv head fastest. The items running at once then read one or two kv heads' keys and
    values, which stay in L2 at long contexts where all heads' would not; lengths within a chunk
    differ by at most `chunk` blocks, which the snake evens out."""
    if not chunk:
        def at(i):
            head, row = jax.lax.rem(i, h), jax.lax.rem(jax.lax.div(i, h), b)
            return head, row, tiles - 1 - jax.lax.div(i, h * b)
        return at
    c = min(chunk, tiles)
    kv_heads = h // groups
    whole = tiles // c * c  # the blocks in whole chunks; the rest form the last chunk
    first_of_rest = h * b * whole  # the first item of the last chunk

    def within(i, width):
        """Item i of a chunk `width` blocks wide: (query head, row, block offset into the chunk)."""
        r, rest = jax.lax.rem(i, groups), jax.lax.div(i, groups)
        u, rest = jax.lax.rem(rest, width), jax.lax.div(rest, width)
        g, row = jax.lax.rem(rest, kv_heads), jax.lax.div(rest, kv_heads)
        return g * groups + r, row, u

    def at(i):
        head, row, u = within(jax.lax.rem(i, h * b * c), c)
        part = jax.lax.div(i, h * b * c)
        if whole == tiles:
            return head, row, tiles - 1 - (part * c + u)
        in_whole = i < first_of_rest
        head2, row2, u2 = within(jnp.maximum(i - first_of_rest, 0), tiles - whole)
        return (jnp.where(in_whole, head, head2), jnp.where(in_whole, row, row2),
                tiles - 1 - jnp.where(in_whole, part * c + u, whole + u2))
    return at


def _launch(offsets, lengths, q, k, v, *, groups, block_q, block_kv, stages, programs, chunk, interpret):
    from jax.experimental.pallas import mosaic_gpu as plgpu  # imported here: only cuda and tests use it

    b, t, h, d = q.shape
    dtype = q.dtype
    tiles = t // (2 * block_q)
    scale = LOG2E / math.sqrt(d)  # scores in base 2: one multiply-add per score before exp2

    # Register layouts are for the compiler; the interpreter has none (and no rule for layout_cast).
    def laid_out(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(dimension, width):
        shape = (block_q, width)
        if interpret:
            return jax.lax.broadcasted_iota(jnp.int32, shape, dimension)
        return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

    items = h * b * tiles  # (query head, row, query block), in the order `_order` gives
    order = _order(h, b, tiles, groups, chunk)
    if programs is None:  # one per SM: on the H200, +8% over one per item at 2k queries, even at 8k and 32k
        programs = 2 if interpret else _sm_count()
    programs = min(programs, items) if programs else items

    def item_at(i, offsets_ref, lengths_ref, wg):
        """Work item `i`: its head, row, the first query of consumer `wg`, the row's offset and length,
        and how many key blocks the producer fetches (what the later consumer needs covers the earlier)."""
        head, row, tile = order(i)
        offset, length = offsets_ref[row], lengths_ref[row]
        _, total, _ = _steps(offset, length, tile * 2 * block_q + block_q, block_q, block_kv)
        return head, row, tile * 2 * block_q + wg * block_q, offset, length, total

    def load_queries(i, offsets_ref, lengths_ref, q_ref, q_smem, q_ready, buffer, wg):
        """Starts the copy of consumer `wg`'s queries of item `i` into its q buffer `buffer`."""
        head, row, first, *_ = item_at(i, offsets_ref, lengths_ref, wg)
        plgpu.copy_gmem_to_smem(q_ref.at[row, pl.ds(first, block_q), head], q_smem.at[buffer],
                                q_ready.at[2 * wg + buffer])

    def schedule(program):
        """This program's items: round n gives each program one of the items [n * programs,
        (n + 1) * programs), in a snake: program p takes the p-th in even rounds and the p-th from the
        end in odd ones, so that the programs' shares even out (items come longest first). Only the
        last round may run short. Returns the n-th item's index as a function of n, and the count."""
        def item_of(n):
            return n * programs + jnp.where(jax.lax.rem(n, 2) == 0, program, programs - 1 - program)

        rounds = pl.cdiv(items, programs)
        return item_of, rounds - 1 + (item_of(rounds - 1) < items).astype(jnp.int32)

    def consumer(n, base, refs, wg, item_of, mine):
        """Consumer `wg`'s share of this program's `n`-th item; `base` counts the key blocks of its
        earlier items (block `j` of this item sits in slot `(base + j) % stages`). Returns the next base.
        Queries alternate between two buffers: the next item's are copied in while this one runs."""
        (offsets_ref, lengths_ref, q_ref, out_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free, turn,
         q_smem2, q_ready) = refs
        head, row, first, offset, length, total = item_at(item_of(n), offsets_ref, lengths_ref, wg)
        full, end, seen = _steps(offset, length, first, block_q, block_kv)
        buffer = jax.lax.rem(n, 2)
        q_smem = q_smem2.at[buffer]
        plgpu.barrier_wait(q_ready.at[2 * wg + buffer])

        @pl.when(n + 1 < mine)
        def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the other buffer's output has left it
            load_queries(item_of(n + 1), offsets_ref, lengths_ref, q_ref, q_smem2, q_ready, 1 - buffer, wg)
        rows_layout = plgpu.Layout.WGMMA.reduce(1)
        top = laid_out(jnp.full((block_q,), MASKED, jnp.float32), rows_layout)
        total_p = laid_out(jnp.zeros((block_q,), jnp.float32), rows_layout)
        acc = laid_out(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)

        def slot_of(j):
            return jax.lax.rem(base + j, stages)

        def take_turn():  # wait until the partner has used the tensor cores, then let it go
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(end > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[slot_of(0)])

        pl.when(wg == 1)(take_turn)  # consumer 0 goes first

        def step(j, carry, masked, width=block_kv):
            """Key block j into the online softmax; `width` < block_kv takes only its first keys (the
            last block, when the rest lie past every query of this consumer)."""
            acc, top, total_p = carry
            slot = slot_of(j)
            k_block, v_block = (x.at[slot, pl.ds(0, width)] for x in (k_smem, v_smem))

            if interpret:  # its wgmma takes neither a transposed operand nor one in registers
                sc = jnp.dot(q_smem[...], k_block[...].T, preferred_element_type=jnp.float32)
                take_turn()
            else:
                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_block.T)
                    take_turn()
                    return acc_ref[...]

                sc = pl.run_scoped(scores, plgpu.ACC((block_q, width), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                key = j * block_kv + iota(1, width)
                # -inf, not MASKED: a masked score's weight is then exactly 0, even in a row that sees no
                # key at all (a query before position 0), whose running max stays at MASKED
                sc = jnp.where((key <= offset + first + iota(0, width)) & (key < length), sc, -jnp.inf)
            new_top = jnp.maximum(top, sc.max(axis=1) * scale)
            rescale = jnp.exp2(top - new_top)
            p = jnp.exp2(sc * scale - jax.lax.broadcast_in_dim(new_top, sc.shape, [0]))
            acc = acc * jax.lax.broadcast_in_dim(rescale, acc.shape, [0])
            total_p = total_p * rescale + p.sum(axis=1)
            p = p.astype(dtype)
            acc, total_p, new_top, p = jax.lax.optimization_barrier((acc, total_p, new_top, p))
            plgpu.barrier_arrive(turn)  # softmax done: the partner may multiply
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(turn)  # the tensor cores are ours again

            def next_keys():
                @pl.when(j + 1 < end)
                def _():
                    plgpu.barrier_wait(k_ready.at[slot_of(j + 1)])

            if interpret:
                acc = acc + jnp.dot(p, v_block[...], preferred_element_type=jnp.float32)
                next_keys()
            else:
                def product(acc_ref):  # accumulates into acc on the tensor cores
                    plgpu.wgmma(acc_ref, p, v_block)
                    next_keys()

                acc = pl.run_state(product)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, new_top, total_p

        carry = (acc, top, total_p)
        carry = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
        last = end - 1
        carry = jax.lax.fori_loop(full, jnp.maximum(last, full), functools.partial(step, masked=True), carry)
        # The last block, when masked: whole, or only its first half when no query of this consumer
        # sees past that (the first consumer's diagonal block, half of whose keys lie past its queries).
        narrow = seen - last * block_kv <= block_kv // 2

        def last_block(carry):
            whole = functools.partial(step, last, masked=True)
            if block_kv % 128:  # a half block must be whole multiples of 64 keys for wgmma
                return whole(carry)
            return jax.lax.cond(narrow, functools.partial(step, last, masked=True, width=block_kv // 2),
                                whole, carry)

        acc, top, total_p = jax.lax.cond(last >= full, last_block, lambda carry: carry, carry)

        @pl.loop(end, total)
        def _(j):  # blocks only the partner needs: release their slots once filled, keep the turns paired
            slot = slot_of(j)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()
            take_turn()

        pl.when(wg == 0)(take_turn)  # pairs consumer 1's first turn
        sees = total_p > 0  # masked weights are exactly 0: the sum is 0 only for a query that sees no key
        out = acc / jax.lax.broadcast_in_dim(jnp.where(sees, total_p, 1.0), acc.shape, [0])
        q_smem[...] = out.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[row, pl.ds(first, block_q), head])
        return base + total

    def producer(i, base, refs):
        """The K/V copies of item `i` (as `consumer`): each K (V) block into its slot once both consumers
        released the K (V) block there before it."""
        offsets_ref, lengths_ref, k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free = refs
        head, row, _, _, _, total = item_at(i, offsets_ref, lengths_ref, 0)

        @pl.loop(0, total)
        def _(j):
            slot = jax.lax.rem(base + j, stages)
            keys = (row, pl.ds(j * block_kv, block_kv), jax.lax.div(head, groups))
            reused = base + j >= stages  # the slot held block base + j - stages

            # A K slot frees up before its V slot (once the scores are in): each copy waits for its own.
            @pl.when(reused)
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])

            @pl.when(reused)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

        return base + total

    def released(g, k_free, v_free):  # waits until both consumers are done with block g's slot
        slot = jax.lax.rem(g, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

    def body(offsets_ref, lengths_ref, q_ref, k_ref, v_ref, out_ref, q_smem4, k_smem, v_smem, k_ready,
             v_ready, q_ready, k_free, v_free, turn):
        program, wg = jax.lax.axis_index("programs"), jax.lax.axis_index("wg")
        item_of, mine = schedule(program)

        @pl.when(wg < 2)
        def _():
            plgpu.set_max_registers(232, action="increase")
            refs = (offsets_ref, lengths_ref, q_ref, out_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free,
                    turn, q_smem4.at[wg], q_ready)

            @pl.when(mine > 0)
            def _():
                load_queries(item_of(0), offsets_ref, lengths_ref, q_ref, q_smem4.at[wg], q_ready, 0, wg)

            jax.lax.fori_loop(0, mine, lambda n, base: consumer(n, base, refs, wg, item_of, mine),
                              jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _():
            plgpu.set_max_registers(40, action="decrease")
            refs = (offsets_ref, lengths_ref, k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free)
            fetched = jax.lax.fori_loop(0, mine, lambda n, base: producer(item_of(n), base, refs), jnp.int32(0))

            @pl.loop(jnp.maximum(fetched - stages, 0), fetched)
            def _(g):  # the last slots' releases: no copy left in flight, every barrier phase observed
                released(g, k_free, v_free)

    def entry(offsets_ref, lengths_ref, q_ref, k_ref, v_ref, out_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            functools.partial(body, offsets_ref, lengths_ref, q_ref, k_ref, v_ref, out_ref),
            plgpu.SMEM((2, 2, block_q, d), dtype, transforms=transforms),  # [consumer, buffer]
            plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=stages),  # K slot filled
            plgpu.Barrier(num_barriers=stages),  # V slot filled
            plgpu.Barrier(num_barriers=4),  # queries loaded, [2 * consumer + buffer]
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K slot released by both consumers
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V slot released by both consumers
            plgpu.Barrier(num_arrivals=2),  # the consumers' turns on the tensor cores
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(programs,),
        grid_names=("programs",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params() if interpret else None,
    )(offsets, lengths, q, k, v)


def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", None) or 132  # an H100 SXM or H200 has 132


def _interpret_params():
    """Mosaic GPU's own interpret mode (threads, barriers, TMA and wgmma emulated on the CPU); Pallas's
    generic one does not run warp-specialized kernels. Public in jax 0.11, private in 0.10."""
    try:
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()
