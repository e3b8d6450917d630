"""Started by tests/test_colab_day.py under torch.distributed.run (two CPU processes, gloo): the script's own setup,
then optimizer steps under torch.profiler. Writes, per process and step, the collectives it ran, the seconds spent
in them (waiting on the other process included) and the step's wall time, to OUT/rank<r>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/two_process_steps.py OUT --preset tiny ..."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from distill_module import load_distill  # noqa: E402


def main():
    from torch.profiler import ProfilerActivity, profile

    distill = load_distill()
    distill.quiet_libraries()
    out, config = Path(sys.argv[1]), distill.parse_args(sys.argv[2:])
    run = distill.start_run(config)
    train_prompts, heldout = distill.prepare_prompts(run)
    folders = distill.fetch_model_folders(run)
    text = distill.cache_text_embeddings(run, train_prompts + heldout, folders[0])
    models, teacher_path = distill.load_run_models(run, folders)
    training = distill.setup_training(run, models, text, train_prompts, heldout, teacher_path)
    steps = []
    for step in range(3):
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            terms, counts, _ = distill.distill_step(models, run.accelerator, text, step, run.config, training.sigmas,
                                                    training.timesteps, len(train_prompts))
            distill.apply_update(models, run.accelerator, training.optimizer, training.lr_scheduler, terms, counts,
                                 run.config, run.mixed_precision)
        collectives, waiting = {}, 0.0
        for event in prof.profiler.kineto_results.events():  # the raw events: prof.events() takes 2.5 s a step here
            if event.name().startswith("gloo:"):
                collectives[event.name()] = collectives.get(event.name(), 0) + 1
                waiting += event.duration_ns() / 1e9
        steps.append({"collectives": collectives, "seconds_in_collectives": waiting,
                      "step_seconds": time.perf_counter() - started})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{run.accelerator.process_index}.json").write_text(json.dumps(steps))
    run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
