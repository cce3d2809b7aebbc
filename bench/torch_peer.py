#!/usr/bin/python3
"""The PyTorch peer of moe_bench: the same MoE shapes, timed with PyTorch's
usual dispatch codes, beside this library's rows, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 \
        /usr/bin/python3 bench/torch_peer.py --moe-bench build-bench/bench/moe_bench

For each shape (T = 4096 tokens, d_model = 512, fp32, dropless, TopK softmax
gates with the Switch aux loss, forward + backward into every parameter and
x; x and dy uniform in [-1, 1] and the router initialised as the library's,
so that the load across experts is alike: the summary prints both max_load
values), each round times PyTorch with three dispatch codes and keeps the
fastest, then runs this library's row of the same shape (moe_bench,
fwd+bwd, TopK/Sparse). Rounds interleave the two, so that both see the same
machine; the ratio printed is the median over rounds of
tokens/s(this library) / tokens/s(PyTorch best).

The dispatch codes, as MoE code in PyTorch is usually written:
  loop    for each expert, index its tokens, run its FFN, index_add back
  sorted  sort the (token, expert) pairs by expert, run each expert on its
          contiguous chunk, index_add back (MegaBlocks' and ScatterMoE's order)
  padded  pad every expert's rows to the largest count, one bmm per GEMM
          (Tutel's and GShard's capacity layout, with capacity = max count)

Needs python3-torch (Debian's PyTorch 1.13, CPU).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

T, D = 4096, 512
SHAPES = [  # (name in moe_bench, experts, k, d_ff, activation)
    ("E8k2/d_ff1024/GELU", 8, 2, 1024, "gelu"),
    ("E8k2/d_ff1024/SwiGLU", 8, 2, 1024, "swiglu"),
    ("E32k4/d_ff256/GELU", 32, 4, 256, "gelu"),
]


class MoE(torch.nn.Module):
    """Router d -> E, softmax over E, top-k gates (unnormalised), the Switch
    aux loss; experts W1 (d -> h, or d -> 2h for SwiGLU's gate and up) and
    W2 (h -> d), no biases: the layer moe_bench times."""

    def __init__(self, experts, k, d_ff, act):
        super().__init__()
        self.E, self.k, self.h, self.act = experts, k, d_ff, act
        width = 2 * d_ff if act == "swiglu" else d_ff
        # The library's router init (TopK's small init, std sqrt(2 / (5 d))):
        # the same spread of logits, so the same load imbalance.
        self.router = torch.nn.Parameter(torch.randn(D, experts) * math.sqrt(2 / (5 * D)))
        self.w1 = torch.nn.Parameter(torch.randn(experts, D, width) / math.sqrt(D))
        self.w2 = torch.nn.Parameter(torch.randn(experts, d_ff, D) / math.sqrt(d_ff))

    def ffn_act(self, h):
        if self.act == "gelu":
            return F.gelu(h)
        gate, up = h[..., : self.h], h[..., self.h:]
        return F.silu(gate) * up

    def route(self, x):
        probs = torch.softmax(x @ self.router, dim=-1)
        gates, experts = probs.topk(self.k, dim=-1)
        counts = torch.zeros(self.E).index_add_(
            0, experts.reshape(-1), torch.ones(experts.numel()))
        aux = 0.01 * self.E / (self.k * T * T) * (counts * probs.sum(0)).sum()
        return gates, experts, aux

    def forward(self, x, code):
        gates, experts, aux = self.route(x)
        tokens = torch.arange(T).repeat_interleave(self.k)
        flat_experts, flat_gates = experts.reshape(-1), gates.reshape(-1)
        y = torch.zeros_like(x)
        if code == "loop":
            for e in range(self.E):
                pick = (flat_experts == e).nonzero(as_tuple=True)[0]
                if pick.numel() == 0:
                    continue
                t = tokens[pick]
                out = self.ffn_act(x[t] @ self.w1[e]) @ self.w2[e]
                y = y.index_add(0, t, out * flat_gates[pick, None])
        elif code == "sorted":
            order = flat_experts.argsort()
            t = tokens[order]
            counts = torch.bincount(flat_experts, minlength=self.E).tolist()
            chunks = torch.split(x[t], counts)
            outs = [self.ffn_act(c @ self.w1[e]) @ self.w2[e]
                    for e, c in enumerate(chunks) if c.shape[0] > 0]
            out = torch.cat(outs)
            y = y.index_add(0, t, out * flat_gates[order, None])
        else:  # padded
            order = flat_experts.argsort()
            t = tokens[order]
            counts = torch.bincount(flat_experts, minlength=self.E)
            capacity = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(order.numel()) - starts[flat_experts[order]]
            padded = x.new_zeros(self.E, capacity, D)
            padded = padded.index_put((flat_experts[order], slot), x[t])
            out = torch.bmm(self.ffn_act(torch.bmm(padded, self.w1)), self.w2)
            out = out[flat_experts[order], slot]
            y = y.index_add(0, t, out * flat_gates[order, None])
        return y, aux


def time_torch(model, code, iters):
    torch.manual_seed(11)
    # Uniform in [-1, 1], as moe_bench fills x and dy.
    x = (torch.rand(T, D) * 2 - 1).requires_grad_()
    dy = torch.rand(T, D) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = model(x, code)
        ((y * dy).sum() + aux).backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def time_library(moe_bench, shape_name):
    row = f"^MoE/{shape_name}/fwd\\+bwd/TopK/Sparse/iterations:"
    out = subprocess.run([moe_bench, f"--benchmark_filter={row}", "--benchmark_format=json"],
                         check=True, capture_output=True, text=True).stdout
    runs = json.loads(out)["benchmarks"]
    if len(runs) != 1:
        sys.exit(f"torch_peer: {len(runs)} moe_bench rows match {row}, expected 1")
    return runs[0]["tokens/s"], runs[0]["max_load"]


def max_load(model):
    """The busiest expert's routed rows over the mean, on an input like
    time_torch's: the padded code's waste, comparable to moe_bench's max_load."""
    torch.manual_seed(11)
    with torch.no_grad():
        _, experts, _ = model.route(torch.rand(T, D) * 2 - 1)
        counts = torch.bincount(experts.reshape(-1), minlength=model.E).double()
    return float(counts.max() / counts.mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moe-bench", help="moe_bench binary (without: PyTorch alone)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=6, help="timed steps per code (moe_bench: 6)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={T}, d_model={D}, "
          f"fp32, forward + backward, {args.rounds} rounds")
    for name, experts, k, d_ff, act in SHAPES:
        torch.manual_seed(0)
        model = MoE(experts, k, d_ff, act)
        ratios, best_names, torch_rates, library_rates = [], [], [], []
        for _ in range(args.rounds):
            seconds = {code: time_torch(model, code, args.iters)
                       for code in ("loop", "sorted", "padded")}
            best = min(seconds, key=seconds.get)
            best_names.append(best)
            torch_rates.append(T / seconds[best])
            line = (f"{name:22s} torch " + " ".join(f"{c} {T / s:7.0f}" for c, s in seconds.items())
                    + " tok/s")
            if args.moe_bench:
                rate, library_load = time_library(args.moe_bench, name)
                library_rates.append(rate)
                ratios.append(library_rates[-1] / torch_rates[-1])
                line += f" | moe {library_rates[-1]:7.0f} tok/s, ratio {ratios[-1]:.2f}"
            print(line, flush=True)
        summary = (f"{name:22s} torch best {statistics.median(torch_rates):7.0f} tok/s "
                   f"({'/'.join(sorted(set(best_names)))}), max_load {max_load(model):.3f}")
        if ratios:
            summary += (f", moe {statistics.median(library_rates):7.0f} tok/s, ratio median "
                        f"{statistics.median(ratios):.2f} (range {min(ratios):.2f} to "
                        f"{max(ratios):.2f}), moe max_load {library_load:.3f}")
        print("=>", summary, flush=True)


if __name__ == "__main__":
    main()
