"""The public contract's hygiene: proto/ passes buf's STANDARD lint (proto/buf.yaml; the deprecated
services' findings are ignored there, each with its reason) and has no breaking change against the
previous release's proto; the STANDARD-named twins of the deprecated operator services take the same
requests, keys and audit classification as the old ones."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from points.v1 import admin_pb2 as pb
from processor import admin, audit, rpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The last commit before the STANDARD services were added: the proto of the previous release.
PREVIOUS_RELEASE = "35bb0a5f63a6c920536804fbf1712ac2113eace8"
TWINS = {
    "points.v1.MerchantAdmin": "points.v1.MerchantAdminService",
    "points.v1.Clearing": "points.v1.ClearingService",
    "points.v1.Programs": "points.v1.ProgramsService",
}


def _buf() -> str:
    """The Buf CLI from the buf-bin package (the `test` extra installs it beside this Python)."""
    beside = pathlib.Path(sys.executable).parent / "buf"
    found = str(beside) if beside.exists() else shutil.which("buf")
    assert found, "the buf CLI is missing: install the test extra (pip install -e '.[test]', which brings buf-bin)"
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_proto_passes_buf_standard_lint():
    result = _run("lint", "proto")
    assert result.returncode == 0, f"buf lint found:\n{result.stdout}{result.stderr}"


def test_proto_has_no_breaking_change_against_the_previous_release():
    known = subprocess.run(
        ["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=ROOT, capture_output=True, timeout=30
    )
    if known.returncode != 0:
        pytest.skip(
            f"this clone lacks commit {PREVIOUS_RELEASE} (the previous release's proto): a shallow "
            "clone; fetch the history (git fetch --unshallow) to run buf breaking"
        )
    result = _run("breaking", "proto", "--against", f".git#ref={PREVIOUS_RELEASE},subdir=proto")
    assert result.returncode == 0, f"buf breaking found:\n{result.stdout}{result.stderr}"


def test_buf_lint_catches_a_service_without_the_suffix(tmp_path):
    """The lint run above is not vacuous: the same configuration refuses a service named like the old ones."""
    shutil.copy(ROOT / "proto" / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "points" / "v1").mkdir(parents=True)
    (tmp_path / "points" / "v1" / "x.proto").write_text(
        'syntax = "proto3";\npackage points.v1;\nservice Widgets {\n'
        "  rpc GetWidget(GetWidgetRequest) returns (GetWidgetResponse);\n}\n"
        "message GetWidgetRequest {}\nmessage GetWidgetResponse {}\n"
    )
    result = subprocess.run([_buf(), "lint", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Service name "Widgets" should be suffixed with "Service"' in result.stdout, result.stdout + result.stderr


def _fields(message) -> list[tuple]:
    return sorted(
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            f.has_presence,
            getattr(f.message_type, "full_name", None),
            getattr(f.enum_type, "full_name", None),
        )
        for f in message.fields
    )


@pytest.mark.parametrize("old, new", sorted(TWINS.items()))
def test_twin_services_take_the_same_requests(old, new):
    """Each new method's request has exactly the old request's fields (names, numbers, types), so the
    adapters in processor/admin.py convert them without loss; a response is a copy or a wrapper."""
    old_service = pb.DESCRIPTOR.services_by_name[old.rpartition(".")[2]]
    new_service = pb.DESCRIPTOR.services_by_name[new.rpartition(".")[2]]
    assert old_service.GetOptions().deprecated
    assert {m.name for m in old_service.methods} == {m.name for m in new_service.methods}
    for method in new_service.methods:
        twin = old_service.methods_by_name[method.name]
        assert method.input_type.name == f"{new_service.name}{method.name}Request"
        assert method.output_type.name == f"{new_service.name}{method.name}Response"
        assert _fields(method.input_type) == _fields(twin.input_type), method.full_name
        out = method.output_type
        if len(out.fields) == 1 and out.fields[0].message_type is twin.output_type:
            continue  # wraps what the old method returned
        assert _fields(out) == _fields(twin.output_type), method.full_name


@pytest.mark.parametrize("old, new", sorted(TWINS.items()))
def test_twin_services_take_the_same_keys_and_are_audited_as_their_twins(old, new):
    # clearing's reads are open to merchants' own keys (issue 15); the others are operator-only
    kinds = ("operator", "merchant", "gateway") if new == "points.v1.ClearingService" else ("operator",)
    assert rpc.ACCEPTED_KINDS[new] == rpc.ACCEPTED_KINDS[old] == kinds
    assert new in rpc.OPERATOR_SERVICES and old in rpc.OPERATOR_SERVICES  # reflection hides admin.proto from others
    assert audit.STATE_CHANGING[new] == audit.STATE_CHANGING[old]


def test_every_new_method_has_an_adapter():
    for servicer in (admin.MerchantAdminServiceServicer, admin.ClearingServiceServicer, admin.ProgramsServiceServicer):
        service = pb.DESCRIPTOR.services_by_name[servicer.__mro__[1].__name__.removesuffix("Servicer")]
        for method in service.methods:
            assert getattr(servicer, method.name).__name__ == method.name, method.full_name
