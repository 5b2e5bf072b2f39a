"""Page tokens of the admin services' List calls (processor/paging.py): what a page ends at comes back
exactly, and a token the service did not issue is INVALID_ARGUMENT, never read as some other page."""

from __future__ import annotations

import pytest

from processor import paging
from processor.domain import Code, Rejection


@pytest.mark.parametrize("value", ["a", "merchant-007", "区域-北京", "x" * 200, "12345"])
def test_a_token_carries_the_value_it_was_made_of(value):
    token = paging.page_token(value)
    assert token and paging.page_token_value(token) == value


def test_the_last_page_has_no_token():
    assert paging.page_token("") == ""


@pytest.mark.parametrize("token", ["!", "%%%", "%%YQ==", "YQ==!", "a", "YQ", "+/8=", "gA=="])
def test_a_token_the_service_did_not_issue_is_invalid_argument(token):
    with pytest.raises(Rejection) as raised:
        paging.page_token_value(token)
    assert raised.value.code is Code.INVALID_ARGUMENT
    assert "next_page_token" in raised.value.message


def test_a_numeric_token_carries_a_number_only():
    assert paging.page_token_value(paging.page_token("42"), numeric=True) == "42"
    with pytest.raises(Rejection):
        paging.page_token_value(paging.page_token("4x"), numeric=True)
