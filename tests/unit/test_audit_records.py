"""What an audit record stores of a request (processor/audit.py): secrets redacted at any depth, size bounded."""

from __future__ import annotations

import hashlib
import json

from points.v1 import admin_pb2
from processor import audit


def test_a_message_is_stored_with_its_proto_field_names_and_secrets_redacted():
    request = admin_pb2.IssueApiKeyRequest(
        kind=admin_pb2.API_KEY_KIND_GATEWAY, merchant_ids=["a", "b"], description="till"
    )
    assert json.loads(audit.request_json(request)) == {
        "kind": "API_KEY_KIND_GATEWAY",
        "merchant_ids": ["a", "b"],
        "description": "till",
    }
    cli = {"merchant_id": "m", "key": "pk_0123_secret", "nested": [{"pin": "1234", "new_pin": "9999"}]}
    assert json.loads(audit.request_json(cli)) == {
        "merchant_id": "m",
        "key": "[redacted]",
        "nested": [{"pin": "[redacted]", "new_pin": "[redacted]"}],
    }


def test_a_request_larger_than_the_bound_is_stored_as_its_size_and_hash():
    request = admin_pb2.CreateMerchantRequest(merchant=admin_pb2.Merchant(merchant_id="m", name="x" * 100_000))
    text = json.dumps(audit.redact({"merchant": {"merchant_id": "m", "name": "x" * 100_000}}), sort_keys=True)
    stored = json.loads(audit.request_json(request))
    assert stored == {
        "truncated": True,
        "bytes": len(text.encode()),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
