"""Time one stage-2 evaluation of a lab configuration, part by part, on the student it starts from.

    .venv/bin/python scripts/bench_eval.py --threads 1 --repeats 5
    .venv/bin/python scripts/bench_eval.py --preset quick --cache /tmp/cache

Builds (or finds in the artifact cache) the configuration's upstream artifacts, then times the evaluator's call
(every metric of a metrics row), each reference set's scoring against the student, the reverse-KL part (the
student's own samples scored by oracle and teacher), and GPT-2's activation alone (Hugging Face's against
``TanhGELU``). Prints one JSON line: seconds, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.activations import NewGELUActivation

from teacherhack import config as cfg
from teacherhack import seeds
from teacherhack.cache import ArtifactCache, default_cache_dir
from teacherhack.distill import wrap
from teacherhack.launch import keep_freed_memory
from teacherhack.metrics import Evaluator, SampleSet, ScoredSamples, load_sample_sets, sample_in_batches
from teacherhack.models import TanhGELU, load_pretrained
from teacherhack.presets import LAB_PRESETS
from teacherhack.stages import prepare_upstream


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(LAB_PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="artifact cache (default: the lab's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()  # as a stage-2 run's process does
    c = cfg.resolve(args.preset, cfg.parse_assignments(args.set))
    if c.threads:
        torch.set_num_threads(c.threads)
    # built on the threads a lab would use (so that it finds the lab's cached models: they are keyed by them), timed
    # on --threads
    up = prepare_upstream(c, ArtifactCache(args.cache), "cpu", {})
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(up.tokenizer)
    oracle, teacher, student = (wrap(load_pretrained(path), tokenizer, "cpu", temperature, c.models.vocab_size)
                                for path, temperature in ((up.oracle, c.models.oracle_temperature), (up.teacher, 1.0),
                                                          (up.student, 1.0)))
    e = c.eval
    start = time.perf_counter()
    evaluator = Evaluator(oracle, teacher, load_sample_sets(up.references) | load_sample_sets(up.train_references),
                          samples_per_prompt=e.samples_per_prompt, estimator=e.estimator, per_token=e.per_token,
                          reverse_samples=e.reverse_samples, batch_size=e.batch_size,
                          max_new_tokens=c.task.max_response_len, seed=c.seed + seeds.EVALUATION,
                          frozen=load_file(str(up.reference_scores)))  # as a stage-2 run builds it
    setup = time.perf_counter() - start
    figures = {"preset": args.preset, "threads": args.threads, "setup_s": setup,
               "evaluation_s": best(lambda: evaluator(student, 0), args.repeats)}
    for name, scored in evaluator.scored.items():
        figures[f"{name}_s"] = best(lambda: scored.measure(student, **evaluator.options, entropy=name == "teacher"),
                                    args.repeats)
    if evaluator.reverse_prompts is not None:
        def reverse() -> None:
            samples = sample_in_batches(student, evaluator.reverse_prompts, max_new_tokens=evaluator.max_new_tokens,
                                        batch_size=evaluator.batch_size, seed=0)
            own = ScoredSamples(student, SampleSet(evaluator.reverse_prompts, samples), eos_id=student.eos_id,
                                batch_size=evaluator.batch_size)
            own.measure(oracle, **evaluator.options)
            own.measure(teacher, **evaluator.options)
            own.entropy(per_token=e.per_token)
        figures["reverse_s"] = best(reverse, args.repeats)
    # GPT-2's activation alone, Hugging Face's eight passes against TanhGELU's pieces, at the width of the student's
    # and of the oracle's MLPs on one batch of reference samples (as scoring runs it: no gradient)
    prompts, responses, _ = evaluator.scored["oracle"].batches[0]
    for name, model in (("student", student), ("oracle", oracle)):
        config = model.model.config
        if getattr(config, "activation_function", None) == "gelu_new":
            positions = prompts.ids.shape[1] + responses.shape[1] - 1  # the prompt and all but the last response token
            x = torch.randn(len(prompts), positions, config.n_inner or 4 * config.n_embd)
            with torch.no_grad():
                figures[f"gelu_{name}_hugging_face_s"] = best(lambda: NewGELUActivation()(x), args.repeats)
                figures[f"gelu_{name}_s"] = best(lambda: TanhGELU()(x), args.repeats)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
