"""Run timm's own model tests (``tests/test_models.py`` of a timm checkout) on the models gateify registers.

    python scripts/timm_model_tests.py ~/src/pytorch-image-models                     # gateify's five CIFAR ResNets
    python scripts/timm_model_tests.py ~/src/pytorch-image-models --models resnet18   # timm's own, as the reference
    python scripts/timm_model_tests.py ~/src/pytorch-image-models -- -x -k fx         # more pytest arguments

Use a checkout (or the sdist, ``pip download timm==X --no-deps --no-binary :all:``) of the timm version that is
installed: the installed timm is the one tested, the checkout only provides the test file. Nothing is downloaded
and nothing is written into the checkout. What the script does:

* copies ``tests/test_models.py`` into a temporary directory and runs it there with pytest;
* imports gateify first, so ``resnet20``... are in timm's registry when the test file lists the models;
* adds ``'cifar_resnet'`` to the test file's ``FEAT_INTER_FILTERS``: timm lists by module name the models whose
  ``forward_intermediates`` / ``prune_intermediate_layers`` it tests, and gateify's module is not in timm's list;
* keeps only the tests that timm parametrises with a ``model_name`` among ``--models``, once per model (a test over
  pretrained tags runs with the first, default tag, e.g. ``resnet18.a1_in1k``). timm's tests with a hard-coded
  model list (``['resnet18', 'resnet50d', 'convnext_atto']``) run for those names only;
  ``tests/test_timm_contract.py`` checks the same conventions on gateify's models. The tests that download
  pretrained weights (``test_model_load_pretrained`` ...) are left out: gateify's models have none.

Prints, per test function, each model's outcome, and exits with pytest's status. About a minute for the five CIFAR
ResNets on 2 CPU cores (timm 1.0.31: 18,000 tests collected, 55 selected).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import timm

import gateify  # noqa: F401  (registers the CIFAR ResNets into timm before the test file lists models)

FEATURE_LIST = "FEAT_INTER_FILTERS = ["
GATEIFY_MODULE = "cifar_resnet"
# timm's tests that download pretrained weights (for its models with weights): never run here
DOWNLOADING = ("test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained")


class SelectModels:
    """pytest plugin: keep the tests parametrised with one of ``models`` as ``model_name``; record outcomes."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.where: dict[str, tuple[str, str]] = {}  # nodeid -> (test function, model)
        self.outcomes: dict[tuple[str, str], str] = {}

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep, drop = [], []
        for item in items:
            name = getattr(getattr(item, "callspec", None), "params", {}).get("model_name")
            # tests over pretrained tags ('resnet18.a1_in1k') run once per model, with its first (default) tag
            model = name.partition(".")[0] if isinstance(name, str) else None
            key = (item.originalname, model)
            if model in self.models and key not in self.where.values() and item.originalname not in DOWNLOADING:
                self.where[item.nodeid] = key
                keep.append(item)
            else:
                drop.append(item)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        key = self.where.get(report.nodeid)
        if key is None:
            return
        if report.failed:
            self.outcomes[key] = "FAILED" if report.when == "call" else f"ERROR ({report.when})"
        elif report.skipped:
            self.outcomes.setdefault(key, "skipped")
        elif report.when == "call":
            self.outcomes.setdefault(key, "passed")

    def table(self) -> str:
        tests = list(dict.fromkeys(test for test, _ in self.where.values()))
        width = max([len(t) for t in tests] + [4])
        lines = [f"{'test':<{width}}  " + "  ".join(f"{m:>10}" for m in self.models)]
        for test in tests:
            cells = [self.outcomes.get((test, m), "-" if (test, m) not in self.where.values() else "not run")
                     for m in self.models]
            lines.append(f"{test:<{width}}  " + "  ".join(f"{c:>10}" for c in cells))
        counts = collections.Counter(self.outcomes.values())
        lines.append("totals: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
        return "\n".join(lines)


def prepare(checkout: Path, out: Path) -> Path:
    """The checkout's test file, copied into ``out`` with gateify's module added to FEAT_INTER_FILTERS."""
    source = checkout / "tests" / "test_models.py"
    if not source.is_file():
        sys.exit(f"{source} not found: pass the root of a timm checkout (the folder that holds tests/).")
    version_file = checkout / "timm" / "version.py"
    if version_file.is_file() and repr(timm.__version__) not in version_file.read_text():
        print(f"note: the checkout's {version_file.relative_to(checkout)} does not say {timm.__version__!r}, the "
              f"installed timm's version; its tests may expect another timm.", file=sys.stderr)
    text = source.read_text()
    if text.count(FEATURE_LIST) == 1:
        text = text.replace(FEATURE_LIST, f"{FEATURE_LIST}{GATEIFY_MODULE!r}, ")
    else:
        print(f"note: {FEATURE_LIST!r} not found once in {source}; forward_intermediates tests will not cover "
              f"gateify's models.", file=sys.stderr)
    target = out / "test_models.py"
    target.write_text(text)
    (out / "pytest.ini").write_text("[pytest]\n")  # nothing of gateify's or the checkout's configuration
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="root of a timm checkout or unpacked sdist (holds tests/)")
    parser.add_argument("--models", nargs="+", default=timm.list_models(module=GATEIFY_MODULE),
                        help="model names to test (default: the models gateify registers)")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="timm_model_tests_"))
    try:
        test_file = prepare(args.checkout.expanduser().resolve(), out)
        selector = SelectModels(args.models)
        status = pytest.main([str(test_file), "-c", str(out / "pytest.ini"), "--rootdir", str(out), "-q",
                              "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                              *args.pytest_args], plugins=[selector])
        print(f"\ntimm {timm.__version__}, tests from {args.checkout}:\n{selector.table()}")
        return int(status)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
