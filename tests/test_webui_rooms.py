"""The web UI's rooms: gradio lives in the modules that build the page alone (the package imports, and ``main``
says what is missing, without it); the three ways to start the UI answer ``--help``; errors are told by the page's
field labels."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from difflora.errors import InvalidArgumentError
from difflora.webui import SLOT_COUNT, AdapterSlot, BlendRequest, GenerateRequest, TrainRequest, parse_prompt_loras

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "difflora"
PYTHON = sys.executable


def runtime_imports(tree: ast.AST) -> set[str]:
    """Top-level package names a module imports when it runs (``if TYPE_CHECKING:`` blocks are for type checkers)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_only_the_page_imports_gradio():
    """The modules that build the page (``page.py``, ``page_kit.py``, one ``tab_*.py`` per tab) and no other."""
    importers = sorted(
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if "gradio" in runtime_imports(ast.parse(path.read_text(encoding="utf-8")))
    )
    tabs = sorted(str(path.relative_to(REPO)) for path in (PACKAGE / "webui").glob("tab_*.py"))
    assert len(tabs) == 4
    assert importers == sorted(["difflora/webui/page.py", "difflora/webui/page_kit.py", *tabs])


def test_the_package_imports_without_gradio():
    loaded = run_python("import sys, difflora.webui\n"
                        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'gradio'))")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_without_gradio_main_says_so_in_one_line(tmp_path):
    hidden = run_python(
        "import sys; sys.modules['gradio'] = None  # as if it were not installed\n"
        "from difflora.webui import main\n"
        "sys.exit(main(sys.argv[1:]))",
        "--lora-dir", str(tmp_path),
    )
    assert hidden.returncode == 2, hidden.stderr
    assert hidden.stderr.splitlines() == ["difflora: error: the web UI needs gradio: pip install 'difflora[webui]'"]
    assert list(tmp_path.iterdir()) == []  # nothing written in the adapter folder


@pytest.mark.parametrize("command", [
    [PYTHON, "-m", "difflora.webui"],
    [PYTHON, "webui/app.py"],
    [str(Path(PYTHON).parent / "difflora"), "webui"],
])
def test_every_way_to_start_answers_help(command):
    shown = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: difflora webui ") and "--lora-dir" in shown.stdout
    assert "--data-root DIR" in shown.stdout


def test_a_missing_adapter_folder_is_told_by_its_flag(tmp_path):
    """The library names the parameter (``lora_dir``); the command line tells it by its flag."""
    missing = tmp_path / "no-such-folder"
    started = subprocess.run([PYTHON, "-m", "difflora.webui", "--lora-dir", str(missing)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 2
    assert started.stderr.splitlines() == [f"difflora: error: --lora-dir {missing}: no such folder (create it first)"]


def test_a_missing_data_root_is_told_by_its_flag_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-such-folder"
    started = subprocess.run([PYTHON, "-m", "difflora.webui", "--lora-dir", str(tmp_path), "--data-root", str(missing),
                              "--model", str(tmp_path / "no-such-model")], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert started.returncode == 2
    assert started.stderr.splitlines() == [f"difflora: error: --data-root {missing}: no such folder (create it first)"]
    assert list(tmp_path.iterdir()) == []  # nothing written in the adapter folder


def form_error(parse, values) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        parse(values)
    return caught.value


def generate_values(steps=3) -> list:
    form = ["a castle", "", steps, 5.0, 0, False, 64, 64, "Model default", 1, False]
    return form + [[[None, 1.0, True, ""]] * 2]


def test_errors_are_told_by_the_label_of_their_field():
    pytest.importorskip("gradio")
    from difflora.webui.page import BLEND_LABELS, GENERATE_LABELS, TRAIN_LABELS, progress_html, in_field_words
    from difflora.webui.training_job import TrainingStatus

    steps = form_error(GenerateRequest.from_form, generate_values(steps=0))
    assert in_field_words(steps, GENERATE_LABELS) == "Steps: must be a whole number >= 1, got 0"
    blend_values = [None, 1.0, ""] * SLOT_COUNT + ["svd", -1, 0.5]
    rank = form_error(BlendRequest.from_form, blend_values)
    assert in_field_words(rank, BLEND_LABELS) == "Rank (svd, ties, dare): must be a whole number >= 0, got -1"
    with pytest.raises(InvalidArgumentError) as caught:
        TrainRequest("named", "data", batch_size=0).options(native_size=64)
    assert in_field_words(caught.value, TRAIN_LABELS) == "Batch size: must be a whole number >= 1, got 0"
    # A message that does not start with the parameter keeps its words after the label; no label, no change.
    assert in_field_words(InvalidArgumentError("needs a rank", "rank"), TRAIN_LABELS) == "Rank: needs a rank"
    assert in_field_words(InvalidArgumentError("rank must be > 0", "rank"), GENERATE_LABELS) == "rank must be > 0"
    assert in_field_words(InvalidArgumentError("no parameter here"), TRAIN_LABELS) == "no parameter here"
    # An adapter row's weight and block weights are told by the row, whatever words the library used for them.
    weight = InvalidArgumentError("weight of 'alpha' must be a finite number in [-100, 100], got 150.0", "weight")
    row = AdapterSlot("alpha.safetensors", row=2).told(weight, "weight")
    assert (type(row), row.parameter) == (InvalidArgumentError, "weight_2")
    assert in_field_words(row, GENERATE_LABELS) == (
        "Weight of adapter 2: must be a finite number in [-100, 100], got 150.0")
    tag = AdapterSlot("alpha.safetensors", tag="<lora:alpha:150>").told(weight, "weight")
    assert in_field_words(tag, GENERATE_LABELS) == (
        "Prompt: tag <lora:alpha:150>: weight must be a finite number in [-100, 100], got 150.0")
    plain = AdapterSlot("alpha.safetensors").told(weight, "weight")  # a caller of the session, not the page
    assert (str(plain), plain.parameter) == (
        "weight of alpha.safetensors must be a finite number in [-100, 100], got 150.0", "weight")
    too_large = InvalidArgumentError("weight of adapter 'alpha' is too large for unet.x in fp16; use a smaller weight",
                                     "weight")
    assert in_field_words(AdapterSlot("a", row=4).told(too_large, "weight"), GENERATE_LABELS) == (
        "Weight of adapter 4: is too large for unet.x in fp16; use a smaller weight")
    blocks = InvalidArgumentError("block_weights: up.9: the model has no such block", "block_weights")
    assert in_field_words(AdapterSlot("a", row=1).told(blocks, "block_weights"), GENERATE_LABELS) == (
        "Block weights of adapter 1: up.9: the model has no such block")
    unnamed = InvalidArgumentError("down must be a number, got 'x'")  # no parameter: still told by the row
    assert in_field_words(AdapterSlot("a", row=3).told(unnamed, "block_weights"), GENERATE_LABELS) == (
        "Block weights of adapter 3: down must be a number, got 'x'")
    # A training run that fails on bad input in the background is told in the Train tab's words too.
    error = InvalidArgumentError("lr must be > 0, got -1.0", "lr")
    failed = TrainingStatus("failed", name="x", message=f"training failed: {error}", error=error)
    assert "training failed: Learning rate: must be &gt; 0, got -1.0" in progress_html(failed)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e38, 150, -100.5, "lots"], ids=str)
def test_a_weight_is_checked_once_by_the_librarys_rule_and_told_with_its_range(value):
    """Adapter rows, prompt tags, blend rows and the session's own callers all check a weight with
    ``lora.adapter_weight`` (the range the runtime enforces), so the page says the range, not just "finite"."""
    pytest.importorskip("gradio")
    from difflora.lora import adapter_weight
    from difflora.webui.page import BLEND_LABELS, GENERATE_LABELS, in_field_words

    with pytest.raises(InvalidArgumentError) as rule:
        adapter_weight(value)
    reason = str(rule.value).removeprefix("weight ")  # "must be a finite number in [-100, 100], got nan"
    assert "[-100, 100]" in reason or "must be a number" in reason

    values = generate_values()
    values[-1] = [[None, 1.0, True, ""], ["beta.safetensors", value, True, ""]]  # the second row
    assert in_field_words(form_error(GenerateRequest.from_form, values), GENERATE_LABELS) == (
        f"Weight of adapter 2: {reason}")
    tagged = form_error(parse_prompt_loras, f"a castle <lora:beta:{value}>")
    assert tagged.parameter == "prompt"
    assert in_field_words(tagged, GENERATE_LABELS) == f"Prompt: tag <lora:beta:{value}>: weight {reason}"
    blend_values = ["alpha.safetensors", value, ""] + [None, 1.0, ""] * (SLOT_COUNT - 1) + ["concat", 0, 0.5]
    assert in_field_words(form_error(BlendRequest.from_form, blend_values), BLEND_LABELS) == (
        f"Weight of adapter 1: {reason}")
    with pytest.raises(InvalidArgumentError) as caught:
        AdapterSlot("beta.safetensors", value)  # a caller of the session, not the page
    assert str(caught.value) == f"weight of beta.safetensors {reason}"


def test_weights_at_the_ends_of_the_range_are_accepted():
    _, slots = parse_prompt_loras("<lora:a:-100> <lora:b:100> <lora:c>")
    assert [(slot.file, slot.weight) for slot in slots] == [("a.safetensors", -100.0), ("b.safetensors", 100.0),
                                                            ("c.safetensors", 1.0)]
    blend_values = ["a.safetensors", -100, "", "b.safetensors", 100, ""] + [None, 1.0, ""] * (SLOT_COUNT - 2) + [
        "concat", 0, 0.5]
    adapters = BlendRequest.from_form(blend_values).adapters
    assert [(slot.file, slot.weight) for slot in adapters] == [("a.safetensors", -100.0), ("b.safetensors", 100.0)]
