"""Local models (`mlxqwen.library`) and the `pull` / `list` / `rm` commands, offline: the
Hugging Face cache is a temporary folder laid out as huggingface_hub writes it, and the Hub
is never contacted (HF_HUB_OFFLINE)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoints import build_reference, save_checkpoint
from huggingface_hub import constants

import mlxqwen
import mlxqwen.demo
from mlxqwen import ConvertError, library, memory
from mlxqwen.cli import main
from mlxqwen.display import format_size
from mlxqwen.pull import PullError, pull

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return save_checkpoint(build_reference("qwen3_5_text"), tmp_path_factory.mktemp("src") / "tiny-qwen")


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """An empty library and an empty Hugging Face cache, offline."""
    monkeypatch.setenv(library.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def cache_repo(source: Path, repo_id: str) -> Path:
    """`source` as a downloaded snapshot of `repo_id` in the Hugging Face cache."""
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def names(where: str | None = None) -> list[str]:
    return [m.name for m in library.local_models() if where is None or m.where == where]


def test_local_models_finds_library_cache_and_demo(env, hf_model):
    models = library.models_dir()
    shutil.copytree(hf_model, models / "tiny-4bit")
    (models / "tiny-Q4_K_M.gguf").write_bytes(b"GGUF")
    shutil.copytree(hf_model, models / ".tiny-8bit.partial-1234")  # a conversion in progress
    (models / "notes").mkdir()  # not a model
    broken = shutil.copytree(hf_model, models / "broken")
    (broken / "model.safetensors").unlink()  # weights missing: not listed
    cache_repo(hf_model, "Qwen/Tiny")
    config_only = Path(constants.HF_HUB_CACHE) / "models--Qwen--Big" / "snapshots" / COMMIT
    config_only.mkdir(parents=True)
    shutil.copy(hf_model / "config.json", config_only)  # what a memory check leaves: not a model

    found = {m.name: m for m in library.local_models()}
    assert names("library") == ["tiny-4bit", "tiny-Q4_K_M.gguf"]
    assert names("hf-cache") == ["Qwen/Tiny"]
    assert found["tiny-4bit"].format == "mlx" and found["tiny-4bit"].weights == "fp32"
    assert found["tiny-Q4_K_M.gguf"].format == "gguf" and found["tiny-Q4_K_M.gguf"].weights == "Q4_K_M"
    assert found["Qwen/Tiny"].repo_id == "Qwen/Tiny" and found["Qwen/Tiny"].size_bytes > 0
    demo = found["mlxqwen-demo"]  # one directory: MLX weights and the GGUF beside them
    assert (demo.format, demo.where, demo.path) == ("mlx+gguf", "demo", mlxqwen.demo.model_path())
    assert library.default_model().where == "library"


def test_default_model_is_the_demo_on_a_fresh_machine(env):
    model = library.default_model()
    assert model.where == "demo" and model.name == "mlxqwen-demo"
    assert (model.path / "config.json").is_file() and (model.path / "model.gguf").is_file()


def test_find_model_suggests_close_names(env, hf_model):
    shutil.copytree(hf_model, library.models_dir() / "Qwen3-Tiny-4bit")
    assert library.find_model("Qwen3-Tiny-4bit").where == "library"
    with pytest.raises(library.ModelNotFoundError, match="did you mean Qwen3-Tiny-4bit"):
        library.find_model("Qwen3-Tiny-4bits")


def test_rm_removes_library_and_cache_models_but_not_the_demo(env, hf_model, capsys):
    shutil.copytree(hf_model, library.models_dir() / "tiny-4bit")
    cache_repo(hf_model, "Qwen/Tiny")
    assert main(["rm", "tiny-4bit", "Qwen/Tiny", "-y"]) == 0
    assert names("library") == [] and names("hf-cache") == []
    assert not (library.models_dir() / "tiny-4bit").exists()
    assert main(["rm", "mlxqwen-demo", "-y"]) == 1
    assert "ships with mlxqwen" in capsys.readouterr().err
    assert main(["rm", "nothing-here", "-y"]) == 1
    assert capsys.readouterr().err == "mlxqwen rm: error: nothing-here: no such local model; see mlxqwen list\n"


def test_rm_asks_before_removing(env, hf_model, monkeypatch, capsys):
    shutil.copytree(hf_model, library.models_dir() / "tiny-4bit")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["rm", "tiny-4bit"]) == 1
    assert "-y" in capsys.readouterr().err
    assert names("library") == ["tiny-4bit"]

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["n"])
    monkeypatch.setattr("builtins.input", lambda *_: next(answers))  # rich's Confirm reads input()
    assert main(["rm", "tiny-4bit"]) == 0  # answered no
    assert names("library") == ["tiny-4bit"]


def test_rm_refuses_the_demo_model_before_asking(env, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked before refusing"))
    assert main(["rm", "mlxqwen-demo"]) == 1
    assert capsys.readouterr().err == (
        "mlxqwen rm: error: mlxqwen-demo: the demo model ships with mlxqwen and cannot be removed\n"
    )


def test_list_shows_every_model(env, hf_model, capsys):
    cache_repo(hf_model, "Qwen/Tiny")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for text in ("Qwen/Tiny", "Hugging Face cache", "mlxqwen-demo", "built in", "MLX+GGUF"):
        assert text in out
    demo = next(line for line in out.splitlines() if line.startswith("mlxqwen-demo"))
    assert format_size(mlxqwen.demo.model_path().stat().st_size) != "" and " MB " in demo  # sizes as people read them


def test_a_model_name_works_wherever_a_path_does(env, hf_model):
    """The names `mlxqwen list` shows open with every command and `mlxqwen.load`."""
    shutil.copytree(hf_model, library.models_dir() / "tiny-4bit")
    assert library.resolve_model("tiny-4bit") == library.models_dir() / "tiny-4bit"
    assert library.resolve_model(hf_model) == hf_model  # a path stays a path
    assert library.resolve_model("mlxqwen-demo") == mlxqwen.demo.model_path()
    with pytest.raises(mlxqwen.ModelNotFoundError, match="tiny-4bits: .*did you mean tiny-4bit"):
        library.resolve_model("tiny-4bits")
    assert mlxqwen.load("tiny-4bit", backend="mlx").config.model_type == "qwen3_5_text"


def test_pull_converts_a_cached_repo_into_the_library(env, hf_model, capsys):
    cache_repo(hf_model, "Qwen/Tiny")
    assert main(["pull", "Qwen/Tiny"]) == 0
    out = capsys.readouterr().out
    assert "Tiny-4bit: converted" in out and "fits" in out
    model = library.find_model("Tiny-4bit")
    assert model.where == "library" and model.weights == "4-bit"
    assert pull("Qwen/Tiny").action == "already in the library"


def test_pull_a_local_directory(env, hf_model):
    pulled = pull(str(hf_model), recipe="8bit")
    assert pulled.action == "converted" and pulled.path == library.models_dir() / "tiny-qwen-8bit"
    assert library.find_model("tiny-qwen-8bit").weights == "8-bit"


def test_pull_offline_says_what_to_do(env, capsys):
    assert main(["pull", "Qwen/Qwen3.6-27B"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlxqwen pull: error: Qwen/Qwen3.6-27B: not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in err and "demo model" in err and err.count("\n") == 1
    assert not library.models_dir().exists()


def test_pull_fails_fast_when_the_hub_cannot_be_reached(env, monkeypatch, capsys):
    """No network (the Hub's name does not resolve): one request, no half a minute of retries."""
    import socket

    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    slept = []
    monkeypatch.setattr(hub_http.time, "sleep", slept.append)  # huggingface_hub's backoff between retries
    resolved = []

    def no_network(host, *args, **kwargs):
        resolved.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert main(["pull", "Qwen/Qwen3.6-27B"]) == 1
    assert "the Hugging Face Hub cannot be reached" in capsys.readouterr().err
    assert slept == [] and 0 < len(resolved) <= 2


def test_pull_refuses_a_model_that_will_not_fit_before_downloading(env, hf_model, monkeypatch):
    snapshot = cache_repo(hf_model, "Qwen/Tiny")
    (snapshot / "model.safetensors").unlink()  # only config.json is needed to refuse
    monkeypatch.setattr(memory, "memory_budget", lambda: 2**20)
    with pytest.raises(PullError, match=r"does not fit.*\(recipe='3bit'\), or pass force=True"):
        pull("Qwen/Tiny")
    assert not library.models_dir().exists()


def test_the_converters_plan_matches_the_converted_model(env, hf_model):
    from mlxqwen.convert.mlx import planned_model

    from mlxqwen.checkpoint import read_json
    from mlxqwen.config import parse_config
    from mlxqwen.loader import load_model

    cfg = parse_config(read_json(hf_model / "config.json"))
    predicted = memory.weight_bytes(planned_model(cfg, "4bit"))
    pulled = pull(str(hf_model))
    model, _ = load_model(pulled.path, lazy=True)
    assert predicted == memory.weight_bytes(model)


def test_pull_rejects_an_unknown_recipe(env, hf_model, capsys):
    with pytest.raises(ConvertError, match="recipe='5bits': expected one of none, 2bit"):
        pull(str(hf_model), recipe="5bits")
    assert main(["pull", str(hf_model), "--recipe", "5bits"]) == 1
    assert capsys.readouterr().err.startswith("mlxqwen pull: error: --recipe 5bits: expected one of none, 2bit")


def test_pull_uses_an_mlx_repo_as_published(env, hf_model, tmp_path):
    from mlxqwen.convert import convert

    mlx_model = convert(hf_model, tmp_path / "Tiny-4bit", recipe="4bit", progress=None).output
    snapshot = cache_repo(mlx_model, "mlx-community/Tiny-4bit")
    pulled = pull("mlx-community/Tiny-4bit")
    assert (pulled.action, pulled.path, pulled.name) == ("downloaded", snapshot, "mlx-community/Tiny-4bit")
    assert library.find_model("mlx-community/Tiny-4bit").weights == "4-bit"
    assert not library.models_dir().exists()
