"""GPU benchmark at the Qwen3-1.7B shape (random weights): the project's loss vs the naive one, and rollouts.

Run on a machine with a CUDA GPU (writes `$OUT/gpu_bench.json`, or `--out`):

    python experiments/bench/gpu_bench.py --out experiments/bench/gpu.json

It measures, side by side in one process and on one GPU (docs/performance.md has the results and targets):

- one OPSD training step: LoRA r=64 on all linear layers, gradient checkpointing, the fixed teacher as
  "adapters disabled", student context 256 + 2048 completion tokens, teacher context 1280 + 2048,
  JSD β=0.5 at T=1.1; batch 2 and 8. Loss implementations: `naive` (full-vocabulary bf16 logits for both
  contexts, JSD on whole tensors: the public reference way) and `chunked` (this project: hidden states,
  fp32 logits per chunk of positions, gradients formed chunk by chunk);
- rollouts with this project's `generate_rollouts` at batch 64 x 256 new tokens, with the default dynamic
  KV cache and with `cache_implementation=static`.

`--smoke` runs every part on the CPU with a tiny Qwen3 (float32) and a few tokens, strictly (an error stops
it instead of being recorded), so a test checks the script: `python experiments/bench/gpu_bench.py --smoke`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.objectives import GeneralizedJSD
from opsd_lightning.objectives.chunked import chunked_divergence_sum, naive_divergence_sum
from opsd_lightning.rollout import SamplingConfig, generate_rollouts

BETA, TEMPERATURE = 0.5, 1.1
RESULTS: list[dict] = []


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where and at what shape one run measures: the GPU run, or the CPU smoke run."""

    device: str
    dtype: torch.dtype
    model: dict  # Qwen3Config's sizes
    step: tuple[int, int, int]  # student prompt, teacher prompt, completion tokens
    rollout: tuple[int, int, int]  # batch, prompt tokens, new tokens
    numerics: tuple[int, int]  # tokens, chunk size
    strict: bool  # an error stops the run (smoke) instead of being recorded


GPU_PLAN = Plan(
    device="cuda",
    dtype=torch.bfloat16,
    model=dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
    ),
    step=(256, 1280, 2048),
    rollout=(64, 256, 256),
    numerics=(300, 128),
    strict=False,
)
SMOKE_PLAN = Plan(
    device="cpu",
    dtype=torch.float32,
    model=dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
    ),
    step=(8, 16, 16),
    rollout=(2, 8, 4),
    numerics=(16, 8),
    strict=True,
)


def synchronize(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def record(out: Path, **row) -> None:
    print(json.dumps(row), flush=True)
    RESULTS.append(row)
    out.write_text(json.dumps(RESULTS, indent=1))


def build_model(plan: Plan, attn: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**plan.model, tie_word_embeddings=True, rope_theta=1e6)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(plan.device):
        return Qwen3ForCausalLM(config).to(plan.dtype)


def random_ids(plan: Plan, *shape: int) -> torch.Tensor:
    return torch.randint(10, plan.model["vocab_size"] - 10, shape, device=plan.device)


def bench_rollouts(model, out: Path, plan: Plan, warm_calls: int) -> None:
    model.eval()
    batch, prompt_len, new_tokens = plan.rollout
    prompt = random_ids(plan, batch, prompt_len)
    tokens = TokenBatch(prompt, torch.ones_like(prompt))
    for cache in (None, "static"):
        sampling = SamplingConfig(
            temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=new_tokens, cache_implementation=cache
        )
        try:
            for attempt in ["first"] + [f"warm{i + 1}" for i in range(warm_calls)]:
                synchronize(plan)
                start = time.perf_counter()
                # No EOS id: every row runs the full budget.
                rollout = generate_rollouts(model, tokens, sampling, [], 0, seed=0)
                synchronize(plan)
                seconds = time.perf_counter() - start
                record(
                    out,
                    what="rollout",
                    cache=cache or "dynamic",
                    call=attempt,
                    batch=batch,
                    new_tokens=new_tokens,
                    generated=rollout.num_tokens,
                    seconds=round(seconds, 2),
                    tokens_per_s=round(rollout.num_tokens / seconds, 1),
                )
        except Exception as error:  # noqa: BLE001 - a failing variant is reported, the bench goes on
            if plan.strict:
                raise
            record(out, what="rollout", cache=cache or "dynamic", error=repr(error)[:300])
        free_memory(plan)


def naive_jsd(peft_model, student_ids, teacher_ids, student_prompt, teacher_prompt, labels):
    """The public reference way: full-vocabulary logits (bf16) for both contexts, JSD on whole tensors."""
    student_logits = peft_model(input_ids=student_ids).logits[:, student_prompt - 1 : -1, :]
    with torch.no_grad(), peft_model.disable_adapter():
        teacher_logits = peft_model(input_ids=teacher_ids).logits[:, teacher_prompt - 1 : -1, :]
    student_logp = F.log_softmax(student_logits / TEMPERATURE, -1)
    teacher_logp = F.log_softmax(teacher_logits / TEMPERATURE, -1)
    beta = torch.tensor(BETA, dtype=student_logp.dtype, device=student_logp.device)
    mixture = torch.logsumexp(
        torch.stack([student_logp + torch.log1p(-beta), teacher_logp + torch.log(beta)]), 0
    )
    jsd = beta * F.kl_div(mixture, teacher_logp, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
        mixture, student_logp, reduction="none", log_target=True
    )
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def make_chunked(chunk_size: int):
    divergence = GeneralizedJSD(beta=BETA, temperature=TEMPERATURE)

    def chunked_jsd(peft_model, student_ids, teacher_ids, student_prompt, teacher_prompt, labels):
        decoder = peft_model.get_base_model().get_decoder()
        head = peft_model.get_base_model().get_output_embeddings()
        student_hidden = decoder(input_ids=student_ids).last_hidden_state[:, student_prompt - 1 : -1]
        with torch.no_grad(), peft_model.disable_adapter():
            teacher_hidden = decoder(input_ids=teacher_ids).last_hidden_state[:, teacher_prompt - 1 : -1]
        mask = labels != -100
        loss_sum = chunked_divergence_sum(
            student_hidden[mask],
            teacher_hidden[mask],
            head.weight,
            labels[mask],
            divergence,
            chunk_size=chunk_size,
        )
        return loss_sum / mask.sum()

    return chunked_jsd


def free_memory(plan: Plan) -> None:
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def check_numerics(out: Path, plan: Plan) -> None:
    """The chunked loss on a bf16 CUDA weight (float32 logits via mm's out_dtype) vs float32 naive."""
    torch.manual_seed(0)
    hidden, vocab = plan.model["hidden_size"], plan.model["vocab_size"]
    tokens, chunk_size = plan.numerics
    weight = (0.02 * torch.randn(vocab, hidden, device=plan.device)).to(plan.dtype)
    student = torch.randn(tokens, hidden, device=plan.device, dtype=plan.dtype).requires_grad_()
    teacher = (student.detach().float() + 0.5 * torch.randn_like(student.float())).to(plan.dtype)
    token_ids = torch.randint(0, vocab, (tokens,), device=plan.device)
    divergence = GeneralizedJSD(beta=BETA, temperature=TEMPERATURE)
    loss = chunked_divergence_sum(student, teacher, weight, token_ids, divergence, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().float().requires_grad_()
    fp32 = (teacher.float(), weight.float(), token_ids, divergence)
    reference = naive_divergence_sum(reference_student, *fp32)
    (reference_grad,) = torch.autograd.grad(reference, reference_student)
    record(
        out,
        what="numerics_bf16_weight_vs_fp32_naive",
        loss=float(loss),
        reference=float(reference),
        loss_rel_diff=float((loss - reference).abs() / reference.abs()),
        grad_rel_diff=float((grad.float() - reference_grad).norm() / reference_grad.norm()),
    )


def bench_step(peft_model, optimizer, out: Path, plan: Plan, name: str, loss_fn, batch: int, repeats: int):
    student_prompt, teacher_prompt, completion = plan.step
    cuda = plan.device == "cuda"
    try:
        free_memory(plan)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        student_ids = random_ids(plan, batch, student_prompt + completion)
        teacher_ids = torch.cat([random_ids(plan, batch, teacher_prompt), student_ids[:, student_prompt:]], 1)
        labels = student_ids[:, student_prompt:].clone()
        times = []
        for _ in range(repeats + 1):
            synchronize(plan)
            start = time.perf_counter()
            loss = loss_fn(peft_model, student_ids, teacher_ids, student_prompt, teacher_prompt, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(plan)
            times.append(time.perf_counter() - start)
        step = statistics.median(times[1:])
        memory = {}
        if cuda:  # the CPU smoke has no allocator statistics
            peak = torch.cuda.max_memory_allocated()
            memory = {"peak_gib": round(peak / 2**30, 2), "over_start_gib": round((peak - before) / 2**30, 2)}
        record(
            out,
            what="train_step",
            loss=name,
            batch=batch,
            completion_tokens=batch * completion,
            loss_value=round(float(loss), 5),
            step_s=round(step, 3),
            completion_tokens_per_s=round(batch * completion / step, 1),
            **memory,
        )
    except torch.OutOfMemoryError:
        record(out, what="train_step", loss=name, batch=batch, error="out of memory")
    except Exception as error:  # noqa: BLE001
        if plan.strict:
            raise
        record(out, what="train_step", loss=name, batch=batch, error=repr(error)[:300])
    finally:
        optimizer.zero_grad(set_to_none=True)
        free_memory(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_bench.json")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None, help="default: 256 1024")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--skip-rollouts", action="store_true")
    parser.add_argument("--rollout-warm-calls", type=int, default=None, help="default: 3")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 2 8")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU, tiny shapes, strict")
    args = parser.parse_args()
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    # The smoke run's own defaults: chunks that split its 16 completion tokens, one of everything.
    defaults = (
        {"chunk_sizes": [8], "repeats": 1, "rollout_warm_calls": 1, "batches": [2]}
        if args.smoke
        else {"chunk_sizes": [256, 1024], "repeats": 3, "rollout_warm_calls": 3, "batches": [2, 8]}
    )
    for option, value in defaults.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build_model(plan, args.attn)
    record(
        args.out,
        what="setup",
        gpu=torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (smoke)",
        torch=torch.__version__,
        params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 6),
        chunk_sizes=args.chunk_sizes,
        init_s=round(time.perf_counter() - start, 1),
    )
    check_numerics(args.out, plan)
    if not args.skip_rollouts:
        bench_rollouts(model, args.out, plan, warm_calls=args.rollout_warm_calls)

    from peft import LoraConfig, get_peft_model

    model.train()
    model.config.use_cache = False
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=targets)
    )
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    for batch in args.batches:
        bench_step(peft_model, optimizer, args.out, plan, "naive", naive_jsd, batch, args.repeats)
        for chunk_size in args.chunk_sizes:
            name = f"chunked_{chunk_size}"
            chunked = make_chunked(chunk_size)
            bench_step(peft_model, optimizer, args.out, plan, name, chunked, batch, args.repeats)
    record(args.out, what="done", total_s=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
