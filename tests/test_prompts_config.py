"""Prompts, the command line and config validation: what a user types and what they are told."""

import json
import re

import pytest

from conftest import REPO, run_main, run_script, tiny_args


def test_prompt_generation_is_deterministic_and_duplicate_free(distill):
    a = distill.generate_prompts(300, seed=3)
    assert a == distill.generate_prompts(300, seed=3)
    assert a != distill.generate_prompts(300, seed=4)
    texts = [p["prompt"] for p in a]
    assert len(set(texts)) == 300
    assert [p["id"] for p in a] == list(range(300))
    assert {p["category"] for p in a} == set(distill.PROMPT_CATEGORIES)
    assert all(set(p) == {"id", "prompt", "category"} for p in a)


def test_prompt_generation_refuses_more_than_it_can_make(distill):
    """It counts the distinct texts (templates without {light} repeat some): 11,040, all of which it can make."""
    assert len({p["prompt"] for p in distill.generate_prompts(11040, seed=0)}) == 11040
    with pytest.raises(distill.UserError, match="NUM_PROMPTS=11041 exceeds the 11040 distinct prompts"):
        distill.generate_prompts(11041, seed=0)


def test_written_prompts_read_back(distill, tmp_path):
    prompts = distill.generate_prompts(20, seed=0)
    distill.write_prompts_jsonl(tmp_path / "p.jsonl", prompts)
    assert distill.read_prompts_jsonl(tmp_path / "p.jsonl") == prompts


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a cat"}', '{"prompt": "a dog"'], r"p.jsonl:2: not valid JSON"),
    (['{"prompt": "a cat"}', '', '{"text": "a dog"}'], r"p.jsonl:3: missing \"prompt\" string"),
    (['{"prompt": "   "}'], r"p.jsonl:1: empty \"prompt\""),
    (['{"prompt": 5}'], r"p.jsonl:1: missing \"prompt\" string"),
    (['["a cat"]'], r"p.jsonl:1: expected an object"),
])
def test_reader_names_file_and_line(distill, tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(distill.UserError, match=message):
        distill.read_prompts_jsonl(path)


def test_reader_reports_every_bad_line_at_once(distill, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": ""}\n{"prompt": "ok"}\nnot json\n')
    with pytest.raises(distill.UserError) as err:
        distill.read_prompts_jsonl(path)
    assert "p.jsonl:1:" in str(err.value) and "p.jsonl:3:" in str(err.value)


def test_empty_and_missing_prompt_files(distill, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(distill.UserError, match="has no prompts"):
        distill.read_prompts_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(distill.UserError, match="GENERATE_PROMPTS=True"):
        distill.read_prompts_jsonl(tmp_path / "nope.jsonl")


def test_heldout_split_takes_the_last_prompts(distill):
    prompts = distill.generate_prompts(10, seed=0)
    train, heldout = distill.split_heldout(prompts, 3)
    assert train == prompts[:7] and heldout == prompts[7:]


def test_prompt_order_covers_each_epoch_once(distill):
    n, batch, accum, world = 10, 2, 1, 1
    seen = [i for step in range(5) for i in distill.prompt_indices(step, 0, 0, world, batch, accum, n, seed=1)]
    assert sorted(seen) == list(range(10))
    # two processes share the stream without overlap
    rank0 = distill.prompt_indices(0, 0, 0, 2, batch, accum, n, seed=1)
    rank1 = distill.prompt_indices(0, 0, 1, 2, batch, accum, n, seed=1)
    assert not set(rank0) & set(rank1)


def test_command_line_parses_to_the_constants_types(distill):
    c = distill.parse_args(["--MAX_STEPS=7", "--LEARNING_RATE=3e-5", "--USE_T5=true", "--RUN_NAME=x",
                            "--SAMPLER_SHIFT=2.5"])
    assert c["MAX_STEPS"] == 7 and c["LEARNING_RATE"] == 3e-5 and c["USE_T5"] is True and c["RUN_NAME"] == "x"
    assert c["SAMPLER_SHIFT"] == 2.5
    assert distill.parse_args(["--SAMPLER_SHIFT=none"])["SAMPLER_SHIFT"] is None


def test_preset_then_overrides(distill):
    c = distill.parse_args(["--preset", "tiny", "--MAX_STEPS=3"])
    assert c["TEACHER_ID"] == distill.TINY_MODEL_ID and c["MAX_STEPS"] == 3


def test_unknown_name_is_refused_with_close_names(distill, capsys):
    assert distill.main(["--MAX_STEP=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting --MAX_STEP" in err and "--MAX_STEPS" in err


def test_bad_values_are_refused(distill):
    with pytest.raises(distill.UserError, match="expected a whole number"):
        distill.parse_args(["--MAX_STEPS=ten"])
    with pytest.raises(distill.UserError, match="expected true or false"):
        distill.parse_args(["--USE_T5=maybe"])


def test_validation_lists_every_problem_with_its_fix(distill, monkeypatch):
    monkeypatch.setattr(distill, "hub_answers", lambda timeout=3.0: True)  # the default Hub model is fine online
    c = distill.parse_args(["--BATCH_SIZE=0", "--GUIDANCE_SCALE=0.5", "--TRAINABLE=most", "--KL_WEIGHT=0",
                            "--EPS_MSE_WEIGHT=0", "--LATENT_MSE_WEIGHT=0", "--IMAGE_SIZE=1000",
                            "--SUPERVISED_STATES=9", "--MIXED_PRECISION=fp8", "--TEACHER_SUBSTEPS=-1",
                            "--HELDOUT_PROMPTS=0", "--DISTRIBUTION_START_STEP=10", "--LORA_USE_DORA=true"])
    with pytest.raises(distill.UserError) as err:
        distill.validate_config(c)
    text = str(err.value)
    for fragment in ("BATCH_SIZE=0", "GUIDANCE_SCALE=0.5", "TRAINABLE='most'", "all 0", "IMAGE_SIZE=1000",
                     "SUPERVISED_STATES=9", "MIXED_PRECISION='fp8'", "TEACHER_SUBSTEPS=-1 must be a whole number >= 1, or 0",
                     "HELDOUT_PROMPTS=0: at least one prompt must be held out", "DISTRIBUTION_START_STEP=10 stages DMD",
                     "LORA_USE_DORA=True is a kind of LoRA"):
        assert fragment in text
    assert text.startswith("Config has 12 problem(s)")


def test_flash_attention_4_is_refused_with_what_is_missing(distill, monkeypatch):
    """ATTENTION_BACKEND="fa4" names what this machine lacks, and how to get it, before any model loads."""
    import importlib.util

    import torch
    import torch.nn.attention

    config = distill.parse_args(["--ATTENTION_BACKEND=fa4"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(distill.UserError, match=r"needs FlashAttention-4: pip install flash-attn-4==4\.0\.0b36"):
        distill.validate_config(config)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distill.UserError, match=r"H100/H200 or B200 GPUs only \(no CUDA GPU here\)"):
        distill.validate_config(config)
    monkeypatch.delattr(torch.nn.attention, "activate_flash_attention_impl")
    with pytest.raises(distill.UserError, match=r"needs a torch with torch\.nn\.attention\.activate_flash_attention_impl"):
        distill.validate_config(config)


def test_attention_hint_only_where_flash_attention_4_would_run(distill, monkeypatch):
    import torch

    cuda = torch.device("cuda")
    assert distill.attention_hint("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert distill.attention_hint("auto", cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert distill.attention_hint("fa4", cuda) is None
    monkeypatch.setattr(distill, "flash_attention_4_problem", lambda: "needs FlashAttention-4")
    assert "pip install flash-attn-4==4.0.0b36 and set it" in distill.attention_hint("cudnn", cuda)
    monkeypatch.setattr(distill, "flash_attention_4_problem", lambda: None)
    assert distill.attention_hint("auto", cuda).endswith("ATTENTION_BACKEND='fa4' made steps 7-9% faster on an H100 "
                                                         "(README, Speed); set it to use it here.")


def test_defaults_are_valid(distill, monkeypatch):
    monkeypatch.setattr(distill, "hub_answers", lambda timeout=3.0: True)  # the default Hub model is fine online
    distill.validate_config(distill.parse_args([]))
    distill.validate_config(distill.parse_args(["--preset", "tiny"]))


def test_missing_prompts_file_is_refused_by_the_script_before_loading_models(tmp_path, distill):
    result = run_main(distill, *tiny_args(tmp_path, "--GENERATE_PROMPTS=false", f"--PROMPTS_JSONL={tmp_path}/none.jsonl"))
    assert result.returncode == 2
    assert "none.jsonl not found" in result.stderr and "GENERATE_PROMPTS=True" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()  # refused before any model was built or loaded


def test_the_notebook_holds_the_scripts_own_cells(distill):
    """scripts/run_onpolicy_distill_colab.ipynb: a note, then exactly the cells --PRINT_COLAB_SETUP prints."""
    notebook = json.loads((REPO / "scripts" / "run_onpolicy_distill_colab.ipynb").read_text())
    code = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert "\n".join(code) + "\n" == distill.colab_setup_text()
    assert len(code) == 4 and all(c.startswith(f"# Cell {i + 1}") for i, c in enumerate(code))
    assert notebook["metadata"]["accelerator"] == "GPU" and notebook["cells"][0]["cell_type"] == "markdown"


def test_print_colab_setup(distill, capsys):
    assert distill.main(["--PRINT_COLAB_SETUP=true"]) == 0
    out = capsys.readouterr().out
    for step in ("pip install", "userdata.get(\"HF_TOKEN\")", "licence", "drive.mount", "python run_onpolicy"):
        assert step in out


def test_prefetch_asks_only_for_needed_files(distill):
    without_t5 = distill.prefetch_patterns(use_t5=False)
    assert "transformer/*.safetensors" in without_t5 and "model_index.json" in without_t5
    assert not any(p.startswith(("text_encoder_3", "tokenizer_3")) for p in without_t5)
    assert not any(p.endswith((".bin", ".ckpt", ".pt")) for p in without_t5)
    assert "text_encoder_3/*.safetensors" in distill.prefetch_patterns(use_t5=True)


def test_import_runs_nothing(distill, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    distill2 = __import__("conftest").load_distill()
    assert list(tmp_path.iterdir()) == [] and distill2.MAX_STEPS == distill.MAX_STEPS


def test_download_size_counts_only_the_selected_files(distill):
    files = [("model_index.json", 500), ("transformer/diffusion_pytorch_model.safetensors", 4_000),
             ("text_encoder_3/model.safetensors", 9_000), ("sd3_medium.safetensors", 10_000),
             ("transformer/diffusion_pytorch_model.bin", 4_000), ("vae/config.json", None)]
    assert distill.download_size(files, distill.prefetch_patterns(use_t5=False)) == 4_500
    assert distill.download_size(files, distill.prefetch_patterns(use_t5=True)) == 13_500


def test_help_lists_every_setting_by_block_with_default_and_comment(distill, capsys):
    assert distill.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Precedence:" in out and "--preset tiny" in out
    for block in ("Model setup:", "Train setup:", "Distill setup:", "Prompt setup:", "Colab setup:", "Output:"):
        assert block in out
    for name in distill.CONFIG_NAMES:
        assert f"--{name}={getattr(distill, name)!r}" in out, name
    assert "--TEACHER_SUBSTEPS=0\n      N: the teacher solves its guided flow" in out
    # where the generated prompts go, as the script writes them
    assert '"" = OUTPUT_ROOT/prompts/generated-n<NUM_PROMPTS>-seed<PROMPT_SEED>.jsonl' in out
    assert distill.main(["-h"]) == 0


def test_a_space_instead_of_equals_gets_a_one_line_hint(distill, capsys):
    assert distill.main(["--MAX_STEPS", "5"]) == 2
    assert "--MAX_STEPS 5: write --MAX_STEPS=5" in capsys.readouterr().err


def test_only_the_config_constants_are_settings(distill, capsys):
    assert "TYPE_CHECKING" not in distill.CONFIG_NAMES and "TINY_MODEL_ID" not in distill.CONFIG_NAMES
    assert "TYPE_CHECKING" not in distill.default_config()
    assert distill.main(["--TYPE_CHECKING=true"]) == 2
    assert "unknown setting --TYPE_CHECKING" in capsys.readouterr().err


def test_preset_says_what_it_sets_and_the_command_line_wins(distill, capsys):
    c = distill.parse_args(["--preset", "tiny", "--MAX_STEPS=12"])
    out = capsys.readouterr().out
    assert c["MAX_STEPS"] == 12 and c["TRAINABLE"] == "all"
    assert "--preset tiny sets TEACHER_ID='tiny-random-sd3'" in out and "TRAINABLE='all'" in out
    assert "MAX_STEPS" not in out and "command line wins" in out


def test_prompts_go_under_output_root_by_default(distill, tmp_path):
    c = distill.parse_args([f"--OUTPUT_ROOT={tmp_path}/elsewhere"])
    assert c["PROMPTS_JSONL"] == str(tmp_path / "elsewhere" / "prompts" / "generated-n512-seed0.jsonl")
    c = distill.parse_args([f"--OUTPUT_ROOT={tmp_path}", "--NUM_PROMPTS=64", "--PROMPT_SEED=3"])
    assert c["PROMPTS_JSONL"] == str(tmp_path / "prompts" / "generated-n64-seed3.jsonl")  # one file per prompt set
    assert distill.parse_args(["--PROMPTS_JSONL=mine.jsonl"])["PROMPTS_JSONL"] == "mine.jsonl"


@pytest.mark.parametrize("args,message", [
    (["--TEACHER_ID=./no/such/folder", "--STUDENT_ID=./no/such/folder"], "TEACHER_ID='./no/such/folder': folder not found"),
    (["--OUTPUT_ROOT={file}/below"], "cannot be created (Not a directory)"),
    (["--IMAGE_SIZE=33", "--LEARNING_RATE=-1"], "IMAGE_SIZE=33 must be a multiple of 4 for TEACHER_ID"),
])
def test_setup_failures_are_one_paragraph_and_exit_2(tmp_path, args, message, distill):
    (tmp_path / "file").write_text("not a folder")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    result = run_main(distill, *tiny_args(tmp_path, *args))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    if "IMAGE_SIZE" in message:  # reported with the other problems, before any model is built
        assert "LEARNING_RATE=-1.0 must be > 0" in result.stderr and not (tmp_path / "cache").exists()


def test_no_network_to_the_hub_is_said_within_seconds(tmp_path):
    import time

    started = time.time()  # a closed port on this machine: the Hub does not answer
    result = run_script(f"--OUTPUT_ROOT={tmp_path}", env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Hugging Face Hub did not answer within 3 s" in result.stderr and "PREFETCH_MODELS" in result.stderr
    assert time.time() - started < 30


def test_readme_shows_the_colab_cells_the_script_prints(distill):
    from conftest import REPO

    assert distill.colab_setup_text() in (REPO / "README.md").read_text()


def test_a_real_teacher_with_the_toy_prompts_is_warned_of(distill):
    defaults = distill.parse_args([])
    (warning,) = distill.setting_warnings(defaults)
    assert warning.startswith("a real teacher (stabilityai/stable-diffusion-3-medium-diffusers) with the built-in toy "
                              "prompts (512 templated prompts)") and "GENERATE_PROMPTS=False, PROMPTS_JSONL=" in warning
    assert distill.setting_warnings(distill.parse_args(["--preset", "tiny"])) == []  # the toy model, the toy prompts
    assert distill.setting_warnings(distill.parse_args(["--GENERATE_PROMPTS=false", "--PROMPTS_JSONL=p.jsonl"])) == []


def test_one_list_of_dependency_ranges(distill):
    """requirements.txt, dep_install() and the Colab cell (so the README and the notebook) hold the same ranges."""
    from conftest import REPO

    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert {re.split(r"[<>=]", line, maxsplit=1)[0]: line[len(re.split(r"[<>=]", line, maxsplit=1)[0]):]
            for line in lines} == distill.REQUIREMENTS
    cell = distill.colab_setup_text().splitlines()[1]
    assert cell.startswith("!pip install -q ") and all(f'"{name}{distill.REQUIREMENTS[name]}"' in cell
                                                       for name in ("diffusers", "transformers", "accelerate", "peft"))


def test_lora_targets_auto_add_the_mlps_at_one_step_only(distill):
    targets = {k: distill.parse_args([f"--NUM_ROLLOUT_STEPS={k}"])["LORA_TARGET_MODULES"] for k in (1, 2, 4)}
    assert targets[2] == targets[4] == ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,"
                                        "attn.add_v_proj,attn.to_add_out")  # diffusers' SD3 LoRA example's
    assert targets[1] == targets[4] + ",ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
    assert distill.parse_args(["--NUM_ROLLOUT_STEPS=1", "--LORA_TARGET_MODULES=attn.to_q"])["LORA_TARGET_MODULES"] \
        == "attn.to_q"  # a list of the user's wins
    assert distill.default_config()["LORA_TARGET_MODULES"] == "auto"


def test_dmd_auto_is_on_where_it_was_measured_to_win_and_weak_choices_are_warned_of(distill):
    weight = {(k, kind): distill.parse_args([f"--NUM_ROLLOUT_STEPS={k}", f"--TRAINABLE={kind}"])["DMD_WEIGHT"]
              for k in (1, 2, 4) for kind in ("lora", "all")}
    assert weight == {(1, "lora"): 1.0, (1, "all"): 1.0, (2, "lora"): 1.0, (2, "all"): 1.0, (4, "lora"): 0.0,
                      (4, "all"): 0.0}
    assert distill.parse_args(["--NUM_ROLLOUT_STEPS=2", "--DMD_WEIGHT=0"])["DMD_WEIGHT"] == 0.0  # a number wins
    assert distill.default_config()["DMD_WEIGHT"] == "auto"
    own = ["--GENERATE_PROMPTS=false", "--PROMPTS_JSONL=p.jsonl"]
    assert distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=1"])) == []  # auto: DMD, MLPs
    attention = f"--LORA_TARGET_MODULES={distill.LORA_ATTENTION}"
    (lora,) = distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=1", attention]))
    assert lora.startswith("a one-step LoRA student without both DMD and the MLPs: on attention alone it drew")
    (lora,) = distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=1", "--DMD_WEIGHT=0"]))
    assert lora.startswith("a one-step LoRA student without both DMD and the MLPs")
    mlps = "--LORA_TARGET_MODULES=attn.to_q,attn.to_v,ff.net.0.proj,ff.net.2"
    assert distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=1", mlps])) == []
    (full,) = distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=1", "--TRAINABLE=all",
                                                           "--DMD_WEIGHT=0"]))
    assert "without DMD drew the right shape 18% of the time, with DMD_WEIGHT=1 43%" in full
    assert distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=1", "--TRAINABLE=all"])) == []
    assert distill.setting_warnings(distill.parse_args([*own, "--NUM_ROLLOUT_STEPS=2"])) == []
