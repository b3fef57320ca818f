"""GPT-style pre-training with per-sample reweighting, in one process or data-parallel under torchrun.

A small byte-level GPT (``reweighting.studies.lm.TinyGPT``) learns the Python standard library's
own source (it ships with every Python, so nothing is downloaded). Batches come from a
:class:`reweighting.DistributedWeightedSampler`, so every rank sees its share of the same global
batch; the loss is the per-sequence loss reweighted over the **global** batch::

    python examples/pretrain_gpt.py --reweighter linupper --steps 200
    torchrun --nproc-per-node 2 examples/pretrain_gpt.py --reweighter linupper --steps 200   # CPU: gloo
    torchrun --nproc-per-node 8 examples/pretrain_gpt.py --device cuda --amp bf16 ...         # GPUs: NCCL

``--reweighter``: ``none`` (plain mean), ``uniform`` / ``linupper`` / ``quadratic`` / ``extremes``
(:class:`reweighting.LossReweighter`) or ``presence`` (:class:`reweighting.PresenceReweighter` on
:class:`reweighting.SelfInfluence`). ``--micro-batches K`` accumulates gradients over ``K``
micro-batches per optimizer step; ``--accumulation global`` normalises the weights over the whole
window (exact: the same update as one step on the concatenated window), ``micro`` per micro-batch
(the loss-based paper's behaviour). The run is the same, up to floating-point rounding, for any
number of processes with the same ``--batch-size`` (global), which the test suite checks.

``--packed``: pre-training packs several documents into each row. The corpus is cut into short
documents (each file's blank-line separated blocks: functions, classes, docstrings), packed left to
right into rows with per-row document ids (:func:`reweighting.packing.pack_documents`), and the
sample the reweighter weights is a **document**: its mean next-token loss over its own tokens
(:func:`reweighting.packing.document_losses`; the prediction of a document's first token from the
previous document is left out). As in usual packed pre-training the model attends across the
documents of a row (no block-diagonal mask), so a document's loss is conditioned on what precedes
it in the row. The number of documents differs per micro-batch and per rank; the weights are
normalised over all of them. PRESENCE is refused here: per-document self-influence is exact only
when the attention keeps documents apart.

``--chunked-loss``: the token losses come from the final hidden states and the output embedding,
``chunk_tokens`` tokens at a time (:func:`reweighting.lm_loss.per_token_lm_loss`), so the
``[B, T, V]`` logits never exist; the losses and gradients are those of the plain path.

Mixed precision (``--amp bf16`` or ``fp16``): the forward runs under autocast, losses and weights
are float32; fp16 adds a gradient scaler, applied to the per-sample losses' gradients so that it
works with every reweighter (their weights see the unscaled losses).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import reweighting as rw
from reweighting import distributed as D
from reweighting.lm_loss import per_token_lm_loss
from reweighting.packing import document_index, document_losses, pack_documents
from reweighting.studies.lm import GPTConfig, TinyGPT, pack_sequences, stdlib_documents

LOSS_STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")
REWEIGHTERS = ("none", *LOSS_STRATEGIES, "presence")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reweighter", choices=REWEIGHTERS, default="linupper")
    p.add_argument("--temperature", type=float, default=0.4, help="r of the loss-based softmax(f / r)")
    p.add_argument("--normalize", choices=("minmax", "quantile", "rank"), default="minmax")
    p.add_argument("--warmup-steps", type=int, default=0, help="uniform weights for this many steps (loss-based)")
    p.add_argument("--switch-step", type=int, default=100, help="PRESENCE: step at which tau goes from +1 to -1")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all ranks, all micro-batches)")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--accumulation", choices=("global", "micro"), default="global")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--packed", action="store_true",
                   help="several short documents per row with document ids; weight documents, not rows")
    p.add_argument("--chunked-loss", action="store_true",
                   help="token losses from hidden states in chunks: the [B, T, V] logits are never built")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk with --chunked-loss (auto)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=None, help="cap the corpus (quick runs)")
    p.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences for the final loss")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default=None, help="write per-step losses and the held-out loss here (JSON, rank 0)")
    return p.parse_args(argv)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (fp16 loss scaling, value untouched)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def setup_distributed(device_arg: str) -> torch.device:
    """Initialise torch.distributed under torchrun (NCCL on GPUs, gloo on CPUs) and pick this rank's device."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device_arg if device_arg not in ("auto", "cuda") else "cpu")


class GPT(TinyGPT):
    """:class:`TinyGPT` whose forward can stop at the final hidden states (for ``--chunked-loss``).

    Going through ``forward`` (rather than calling the blocks from outside) keeps DDP's hooks.
    """

    chunk_tokens: int | None = None

    def forward(self, tokens: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.cfg.context}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x if hidden_only else self.head(x)


def token_losses(model: torch.nn.Module, rows: torch.Tensor, autocast, chunked: bool = False) -> torch.Tensor:
    """Next-token cross-entropy ``[B, T]`` (float32) for rows ``[B, T + 1]``; ``model`` may be DDP-wrapped.

    ``chunked``: from the hidden states and the output embedding in chunks, without the logits.
    """
    with autocast():
        if not chunked:
            logits = model(rows[:, :-1])
        else:
            bare = model.module if isinstance(model, DistributedDataParallel) else model
            hidden = model(rows[:, :-1], hidden_only=True)
            return per_token_lm_loss(hidden, bare.head.weight, rows[:, 1:], chunk_tokens=bare.chunk_tokens)
    return F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:], reduction="none")


def sequence_losses(model: torch.nn.Module, batch: torch.Tensor, autocast, chunked: bool = False) -> torch.Tensor:
    """Per-sequence mean next-token loss ``[B]`` (float32) for rows ``[B, T + 1]``; ``model`` may be DDP-wrapped."""
    return rw.sequence_loss(token_losses(model, batch, autocast, chunked))


def packed_document_losses(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], autocast, chunked: bool = False
) -> torch.Tensor:
    """Per-document mean next-token loss ``[N]`` (float32) for packed rows ``[B, T + 1]`` and their document ids.

    Position ``t`` predicts token ``t + 1`` and belongs to that token's document; the prediction of
    a document's first token (from the previous document) and padding carry no loss.
    """
    rows, ids = batch
    token_loss = token_losses(model, rows, autocast, chunked)
    targets = ids[:, 1:]
    carries = (ids[:, :-1] == targets) & (targets >= 0)
    return document_losses(token_loss, carries, document_ids=targets, pad_id=-1).loss


def split_documents(files: list[bytes], min_bytes: int = 16) -> list[bytes]:
    """Each file's blank-line separated blocks (functions, classes, docstrings) as short documents."""
    return [block for f in files for block in f.split(b"\n\n") if len(block) >= min_bytes]


def heldout_loss(model: TinyGPT, data: torch.Tensor, autocast) -> float:
    model.eval()
    with torch.no_grad():
        loss = sequence_losses(model, data, autocast).mean()
    model.train()
    return float(loss)


def train(args: argparse.Namespace) -> dict:
    device = setup_distributed(args.device)
    world, rank = D.world_size(), D.rank()
    if args.batch_size % (world * args.micro_batches):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by processes x micro-batches "
                         f"= {world} x {args.micro_batches}")
    per_rank = args.batch_size // world
    torch.manual_seed(args.seed)

    documents, heldout_documents = stdlib_documents(args.max_documents)
    if args.packed:
        if args.reweighter == "presence":
            raise ValueError("--packed with PRESENCE: the model attends across a row's documents, so per-document "
                             "self-influence would not be exact; use a loss-based reweighter or none")
        data, doc_ids = pack_documents(split_documents(documents), args.seq_len + 1)
    else:
        data, doc_ids = pack_sequences(documents, args.seq_len), None
    # The held-out loss is on whole windows in both modes, so runs with and without --packed compare.
    heldout = pack_sequences(heldout_documents, args.seq_len, max_sequences=args.eval_sequences).to(device)
    # Uniform dataset weights here; update_weights() would change them between epochs (resampling).
    sampler = rw.DistributedWeightedSampler(torch.ones(len(data)), num_samples=args.steps * args.batch_size,
                                            seed=args.seed)
    indices = iter(sampler)

    if args.chunked_loss and args.reweighter == "presence":
        raise ValueError("--chunked-loss bypasses the output layer's forward, which PRESENCE's self-influence needs")
    model = GPT(GPTConfig(context=args.seq_len, dim=args.dim, layers=args.layers, heads=args.heads)).to(device)
    model.chunk_tokens = args.chunk_tokens
    ddp = DistributedDataParallel(model) if world > 1 else model  # broadcasts rank 0's parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    def scaled(losses: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(losses, loss_scale) if scaler else losses

    no_sync = ddp.no_sync if world > 1 else None
    reweighter = si = None
    if args.reweighter in LOSS_STRATEGIES:
        reweighter = rw.LossReweighter(args.reweighter, temperature=args.temperature, normalize=args.normalize,
                                       warmup_steps=args.warmup_steps, accumulation=args.accumulation)
    elif args.reweighter == "presence":
        if args.accumulation == "global" and args.micro_batches > 1:
            raise ValueError("PRESENCE weights each micro-batch on its own: use --accumulation micro")
        reweighter = rw.PresenceReweighter(switch_step=args.switch_step)
        # The engine writes the weighted gradient itself (summed over ranks), so it runs on the bare model.
        si = rw.SelfInfluence(model, broadcast=[model.pos])

    def sample_losses(net: torch.nn.Module, mb) -> torch.Tensor:
        if args.packed:
            return packed_document_losses(net, mb, autocast, args.chunked_loss)
        return sequence_losses(net, mb, autocast, args.chunked_loss)

    losses_log, ess_log, documents_log = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        rows = torch.tensor([next(indices) for _ in range(per_rank)])
        batch = data[rows].to(device)
        micro_batches = list(batch.chunk(args.micro_batches))
        if args.packed:
            micro_batches = list(zip(micro_batches, doc_ids[rows].to(device).chunk(args.micro_batches)))
        K = len(micro_batches)
        counts = [document_index(mb[1], document_ids=mb[1], pad_id=-1).count if args.packed else mb.shape[0]
                  for mb in micro_batches]
        # Samples in the global window: the rows, or (packed) the documents of all ranks, one all-reduce.
        window_size = (D.all_reduce_sum(torch.tensor(float(sum(counts)), device=device)) if args.packed
                       else torch.tensor(float(args.batch_size), device=device))
        loss_scale = scaler.scale(torch.ones((), device=device)) if scaler else None
        if args.reweighter == "none":
            # Plain mean over the global window: weights 1 / (global batch) on every sample.
            total = torch.zeros((), device=device)
            for k, mb in enumerate(micro_batches):
                with no_sync() if (no_sync and k < K - 1) else nullcontext():
                    losses = sample_losses(ddp, mb)
                    weights = (torch.ones_like(losses) / window_size).detach()
                    loss = rw.weighted_loss(scaled(losses), weights)
                    loss.backward()
                total += loss.detach()
            objective, stats = total, None
        elif si is None:
            objective = reweighter.accumulate(micro_batches, lambda mb: scaled(sample_losses(ddp, mb)),
                                              no_sync=no_sync)
            stats = reweighter.stats
        else:
            objective = torch.zeros((), device=device)
            for mb in micro_batches:
                with si.capture():
                    losses = sequence_losses(model, mb, autocast)
                weights = reweighter.backward(si, losses, advance=False,
                                              scale=(loss_scale if scaler else 1.0) / K)
                objective += rw.weighted_loss(losses.detach(), weights) / K
            stats = reweighter.last_stats
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if si is not None:
            reweighter.advance()
        elif reweighter is not None:
            reweighter.step()
        # Each rank's value is world x its share; their mean is the global weighted loss.
        global_objective = float(D.all_reduce_sum(objective.detach().float()) / world)
        losses_log.append(global_objective)
        ess_log.append(float(stats.ess_fraction) if stats is not None else 1.0)
        documents_log.append(int(window_size))
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {global_objective:.4f}  ess/n {ess_log[-1]:.3f}  "
                  f"samples {documents_log[-1]}  {time.perf_counter() - start:.1f}s", flush=True)

    result = {"reweighter": args.reweighter, "world_size": world, "steps": args.steps,
              "batch_size": args.batch_size, "micro_batches": args.micro_batches, "accumulation": args.accumulation,
              "amp": args.amp, "device": str(device), "packed": args.packed, "chunked_loss": args.chunked_loss,
              "losses": losses_log,
              "ess_fraction": ess_log, "samples_per_step": documents_log,
              "heldout_loss": heldout_loss(model, heldout, autocast), "seconds": time.perf_counter() - start}
    if rank == 0:
        print(f"held-out loss {result['heldout_loss']:.4f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return result


def main(argv: list[str] | None = None) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
