"""Paging of the admin services' List and Export calls (MerchantAdminService, ClearingService,
ChannelService): page sizes, opaque page tokens, export chunks, and a row's moments as the answers
spell them (protobuf Timestamps, ISO 8601 text in CSV). One place, so every service pages the same way
and refuses a bad token with the same message."""

from __future__ import annotations

import base64
import datetime as dt

from google.protobuf import timestamp_pb2

from processor import domain
from processor.servicer import timestamp
from processor.store import micros

LIST_PAGE_DEFAULT, LIST_PAGE_MAX = 100, 1000
# An export page may be large (CSV for a spreadsheet) but is read from Postgres in chunks, so no call
# needs one huge result set.
EXPORT_PAGE_MAX, EXPORT_CHUNK = 50_000, 5_000


def page_size(value: int) -> int:
    """The page size a List request asks for (0 = the default); INVALID_ARGUMENT outside the bounds."""
    size = value or LIST_PAGE_DEFAULT
    if not 1 <= size <= LIST_PAGE_MAX:
        raise domain.invalid_field("page_size", f"page_size must be 0 (default {LIST_PAGE_DEFAULT})..{LIST_PAGE_MAX}")
    return size


def page_token(value: str) -> str:
    """The opaque token of the key a page ended at; "" (no more pages) for ""."""
    return base64.urlsafe_b64encode(value.encode()).decode() if value else ""


def page_token_value(token: str, numeric: bool = False) -> str:
    """The value a page token carries; INVALID_ARGUMENT for a token this service did not issue."""
    try:
        # validate: without it, characters outside the alphabet are dropped, so "!" read as "" (the
        # first page) and "%%YQ==" as "a"; "" is never issued (page_token(""), the last page, is "")
        value = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeError):
        value = None
    if not value or (numeric and not (value.isascii() and value.lstrip("-").isdigit() and len(value) <= 18)):
        raise domain.invalid_field(
            "page_token",
            "page_token is not one this service issued; pass next_page_token from the previous response, or empty",
        )
    return value


def timestamp_of(moment: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A row's moment as a protobuf Timestamp (None stays unset)."""
    return None if moment is None else timestamp(micros(moment))


def iso(moment: dt.datetime) -> str:
    """A row's moment as CSV spells it: ISO 8601 in UTC with a Z."""
    return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
