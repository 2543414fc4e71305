"""Run a function on N gloo ranks in separate processes, as torchrun would start them.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), calls
``fn(*args)`` in each and returns the per-rank results. A failure on any rank raises with that
rank's traceback; a rank that hangs past ``timeout`` seconds fails the call and every process is
killed. ``fn`` must be importable (a module-level function), since the children are spawned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DistributedFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, results, threads):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import warnings

    # megatron-core warns on import about missing transformer-engine / apex; that is expected here
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    import torch

    torch.set_num_threads(threads)
    try:
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron_opd.distributed import teardown

                teardown()
            except Exception:
                pass


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(out) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise DistributedFailure(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not failures:
                    # a rank died without reporting (segfault, OOM kill): fail fast
                    time.sleep(1.0)
                    if results.empty():
                        raise DistributedFailure(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}"
                        ) from None
                continue
            if ok:
                out[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                break
        if failures:
            raise DistributedFailure("\n".join(failures))
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


# --------------------------------------------------------------------------------------------
# Tiny real components for tests and benchmarks (no downloads)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_bpe_tokenizer(
    directory, vocab_size: int = 320, corpus=None, split_digits: bool = False
) -> None:
    """A byte-level BPE with ChatML specials and template, trained on ``corpus`` (default: the
    built-in prompt set). ``split_digits``: every digit its own token, as in Llama/Qwen."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_opd.data import builtin_problems

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus is None:
        corpus = [p.problem for p in builtin_problems(300, seed=0)]
    backend.train_from_iterator([*corpus, "user assistant system"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    tok.save_pretrained(str(directory))


def save_hf_qwen3(
    directory, layers: int, seed: int, vocab: int, scale: float, num_key_value_heads: int = 2
) -> None:
    """A random tiny Qwen3 (4 heads, GQA, q/k norm) saved by transformers; weights ~ N(0, scale)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    import torch

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, scale)
    model.save_pretrained(str(directory))


def convert_hf_checkpoint(hf_dir, save, tokenizer_dir=None) -> None:
    """``hf_dir`` (with ``tokenizer_dir``'s files copied in) converted by the project's converter,
    in its own process (it initializes Megatron at TP1), to a Megatron checkpoint at ``save``."""
    import subprocess
    import sys
    from pathlib import Path

    from megatron_opd.distributed import standalone_env

    hf_dir = Path(hf_dir)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (hf_dir / f.name).write_bytes(f.read_bytes())
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_hf_to_megatron.py"
    subprocess.run(
        [sys.executable, str(script), "--hf-dir", str(hf_dir), "--save", str(save), "--dtype",
         "fp32"],
        check=True,
        capture_output=True,
        env=dict(standalone_env(), PYTHONWARNINGS="ignore"),
    )  # fmt: skip


def logits_from_an_output_layer(logits):
    """``logits`` as if an output layer had just produced them: the same storage (no copy), not a
    leaf, so an op's in-place gradient flows on instead of autograd cloning it into ``.grad``
    (what the benchmarks of the reward op need to time it as training runs it)."""
    import torch

    class OutputLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.detach()

        @staticmethod
        def backward(ctx, grad):
            return None

    return OutputLayer.apply(logits.detach().requires_grad_())


# --------------------------------------------------------------------------------------------
# Processes of a job under test, read from /proc (Linux)


def _proc(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """The live children of ``pid``."""
    return [int(k) for k in _proc(pid, f"task/{pid}/children").split()]


def cmdline(pid: int) -> bytes:
    return _proc(pid, "cmdline")


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of each worker torchrun started (its children, by their ``RANK``)."""
    out = {}
    for pid in children(torchrun_pid):
        for item in _proc(pid, "environ").split(b"\0"):
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def writer_pids(rank_pid: int) -> list[int]:
    """A rank's forked dist-checkpoint writers: its children with its own command line (none
    where Megatron-Core writes from threads of the rank)."""
    own = cmdline(rank_pid)
    return [c for c in children(rank_pid) if own and cmdline(c) == own]


def marked(mark: str) -> list[int]:
    """Live processes (zombies aside) whose environment carries ``mark``: every process a job
    started with it in its environment inherits it."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            pid = int(proc.name)
            if mark.encode() in _proc(pid, "environ") and b"State:\tZ" not in _proc(pid, "status"):
                out.append(pid)
    return out
