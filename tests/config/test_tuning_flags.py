"""llama-server's tuning flags in ``args`` are read into their settings, under every spelling."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from corral.config import ModelSpec, parse_config
from corral.config.tuning import TUNING_SETTINGS
from corral.errors import ConfigError
from corral.llamacpp.flags import RESERVED_FLAGS
from corral.llamacpp.tuning import TUNING_FLAGS

MiB = 1 << 20

# For each setting a flag may give: the value text, and what the setting then holds.
EXAMPLES: dict[str, tuple[str, Any]] = {
    "slots": ("3", 3),
    "gpu_layers": ("all", "all"),
    "cache_type_k": ("q8_0", "q8_0"),
    "cache_type_v": ("q4_0", "q4_0"),
    "batch_size": ("1024", 1024),
    "ubatch_size": ("128", 128),
    "flash_attn": ("off", "off"),
    "cpu_moe": ("5", 5),
    "cpu_ffn": ("4", 4),
    "tensor_overrides": ("ffn_up=CPU,attn_q=CUDA0", ("ffn_up=CPU", "attn_q=CUDA0")),
    "ctx_checkpoints": ("7", 7),
    "prompt_cache": ("512", 512 * MiB),
    "tensor_split": ("3,1", (3.0, 1.0)),
    "split_mode": ("row", "row"),
    "draft.path": ("/m/draft.gguf", "/m/draft.gguf"),
    "draft.gpu_layers": ("12", 12),
    "draft.cache_type_k": ("q8_0", "q8_0"),
    "draft.cache_type_v": ("q8_0", "q8_0"),
    "draft.tensor_overrides": ("exps=CPU", ("exps=CPU",)),
    "draft.cpu_moe": ("2", 2),
}


def spec(**model: Any) -> ModelSpec:
    return parse_config({"models": {"m": {"path": "/m/x.gguf", **model}}}).models["m"]


def setting(s: ModelSpec, dotted: str) -> Any:
    value: Any = s
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def needs(dotted: str) -> list[str]:
    """A draft setting needs a draft file to be about."""
    return ["-md", "/m/draft.gguf"] if dotted.startswith("draft.") and dotted != "draft.path" \
        else []


@pytest.mark.parametrize("flag", sorted(TUNING_FLAGS))
def test_each_spelling_is_read_into_its_setting_and_leaves_args(flag: str) -> None:
    known = TUNING_FLAGS[flag]
    if known.read is None:
        forms = [[flag]]
        expected = known.const
    else:
        text, expected = EXAMPLES[known.setting]
        forms = [[flag, text], [f"{flag}={text}"]]
    for form in forms:
        s = spec(args=["--temp", "0.5", *form, *needs(known.setting), "--jinja"])
        assert setting(s, known.setting) == expected, form
        assert s.args == ("--temp", "0.5", "--jinja"), form  # corral passes it, once


def test_the_flag_and_the_setting_give_the_same_model() -> None:
    by_flags = spec(args=["-ub", "256", "-fa", "off", "--n-cpu-moe", "4", "-ot", "a=CPU",
                          "-kvu", "-nkvo", "--swa-full", "-ctxcp", "3", "-cram", "64",
                          "-ts", "1/1", "-sm", "layer", "-b", "512",
                          "-md", "d.gguf", "-ngld", "8"])
    by_settings = spec(ubatch_size=256, flash_attn="off", cpu_moe=4, tensor_overrides=["a=CPU"],
                       kv_unified=True, kv_offload=False, swa_full=True, ctx_checkpoints=3,
                       prompt_cache="64MiB", tensor_split=[1, 1], split_mode="layer",
                       batch_size=512, draft={"path": "d.gguf", "gpu_layers": 8})
    assert by_flags.settings == by_settings.settings
    assert by_flags.draft is not None and by_flags.draft.path.endswith("/d.gguf")


def test_a_flag_and_its_setting_that_disagree_are_named_both() -> None:
    with pytest.raises(ConfigError) as caught:
        spec(ubatch_size=128, args=["--ubatch-size=256"])
    assert caught.value.problems == [
        "models.m.args: '--ubatch-size 256' and models.m.ubatch_size: 128 disagree; "
        "give one of them"]
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"m": {"path": "x"}}, "defaults": {"kv_offload": True},
                      "llama_server": {"args": ["-nkvo"]}})
    assert caught.value.problems == [
        "llama_server.args: '-nkvo' and defaults.kv_offload: True disagree; give one of them"]
    with pytest.raises(ConfigError) as caught:
        spec(draft={"path": "d.gguf", "gpu_layers": 3}, args=["-ngld", "4"])
    assert "'-ngld 4' and models.m.draft.gpu_layers: 3 disagree" in caught.value.problems[0]


def test_a_flag_and_its_setting_that_agree_are_accepted() -> None:
    s = spec(prompt_cache="512MiB", ubatch_size=256, args=["--cache-ram", "512", "-ub", 256])
    assert s.prompt_cache == 512 * MiB and s.ubatch_size == 256 and s.args == ()


def test_flags_of_llama_server_args_are_defaults_a_model_may_override() -> None:
    config = parse_config({"llama_server": {"args": ["-ub", "128", "--cpu-moe"]},
                           "models": {"a": {"path": "a"}, "b": {"path": "b", "ubatch_size": 64},
                                      "c": {"path": "c", "args": ["-ub", "32"]}}})
    assert [config.models[m].ubatch_size for m in "abc"] == [128, 64, 32]
    assert {config.models[m].cpu_moe for m in "abc"} == {"all"}
    assert config.file.llama_server.args == []


@pytest.mark.parametrize(("args", "problem"), [
    (["-ub", "x"], "models.m.args: '-ub' wants a whole number, got 'x'"),
    (["-ub", "0"], "models.m.args: '-ub 0': Input should be greater than or equal to 1"),
    (["-fa", "maybe"], "models.m.args: '-fa' wants on, off or auto, got 'maybe'"),
    (["--cache-ram", "-1"], "models.m.args: '--cache-ram' -1 (no limit) cannot be planned: "
                            "give a size in MiB, or 0"),
    (["-kvu=1"], "models.m.args: '-kvu' takes no value, got '-kvu=1'"),
    (["-ot", "x=Vulkan0"], "models.m.args: '-ot x=Vulkan0': 'x=Vulkan0': the buffer must be "
                           "CPU or CUDA<n> (the child's n-th GPU, counted from 0), got "
                           "'Vulkan0'"),
    (["-sm", "tensor"], "models.m.args: '-sm tensor': Input should be 'layer', 'row' or 'none'"),
    (["-ub"], "models.m.args: '-ub' needs a value"),
])
def test_a_bad_flag_value_is_named_with_its_flag(args: list[str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec(args=args)
    assert caught.value.problems == [problem]


def test_only_what_corral_owns_stays_refused() -> None:
    issue_flags = {"-b", "--batch-size", "-ub", "--ubatch-size", "-fa", "--flash-attn",
                   "--n-cpu-moe", "--cpu-moe", "-ot", "--override-tensor", "-md",
                   "--model-draft", "-ngld", "-kvu", "--kv-unified", "-nkvo", "--no-kv-offload",
                   "--swa-full", "--ctx-checkpoints", "--cache-ram", "-ts", "--tensor-split",
                   "-sm", "--split-mode"}
    assert issue_flags <= TUNING_FLAGS.keys()
    assert not TUNING_FLAGS.keys() & RESERVED_FLAGS.keys()
    owned = {"-m", "--host", "--port", "--alias", "--api-key", "--log-verbosity",
             "--models-dir", "-hf", "-hfd"}
    assert owned <= RESERVED_FLAGS.keys()


def test_every_tuning_setting_is_typed_on_the_model() -> None:
    s = spec()
    assert {name for name in TUNING_SETTINGS if hasattr(s, name)} == set(TUNING_SETTINGS)


@pytest.mark.integration
def test_every_spelling_of_a_tuning_flag_is_read(llama_server: str) -> None:
    # llama-server --help lists an option's spellings on one line; a spelling corral does not
    # know would pass through to the child beside corral's own value.
    usage = subprocess.run([llama_server, "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    missing = set()
    for line in usage.splitlines():
        names = re.match(r"-[\w-]+(?:,\s*-[\w-]+)*", line) if line.startswith("-") else None
        group = set(re.findall(r"-[\w-]+", names.group())) if names else set()
        if group & TUNING_FLAGS.keys():
            missing |= group - TUNING_FLAGS.keys()
    assert not missing, f"spellings of tuning flags corral does not read: {sorted(missing)}"


def test_flash_attention_off_with_a_quantized_v_cache_is_refused_across_defaults() -> None:
    # llama.cpp cannot store a quantized V cache transposed: each setting alone is valid.
    with pytest.raises(ConfigError) as caught:
        parse_config({"defaults": {"flash_attn": "off"},
                      "models": {"m": {"path": "x", "args": ["-ctvd", "q8_0", "-md", "d"]}}})
    assert caught.value.problems == [
        "models.m.flash_attn: off, but a quantized V cache (draft.cache_type_v: q8_0) needs "
        "flash attention"]
