"""Member presence's pure parts (processor/presence.py) and the spending caps' arithmetic
(processor/velocity.py): TOTP codes at fixed times with pyotp as the reference, PIN hashing, the
refusals' codes and retry times. No database, no network."""

from __future__ import annotations

import hashlib

import pyotp
import pytest

from processor import presence, velocity
from processor.domain import Code, Rejection

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = 1_800_000_000  # a fixed time, seconds: a multiple of 30 (the start of a step)
MINUTE_US = 60_000_000
HOUR_US = velocity.HOUR_US
NOW_US = 1_800_000_000_000_000  # a whole minute


# --- TOTP ---------------------------------------------------------------------------------------------


def test_a_code_of_the_current_step_is_accepted_and_names_its_step():
    code = pyotp.TOTP(SECRET).at(T0 + 7)
    assert presence.totp_step(SECRET, code, T0 + 7) == T0 // 30


def test_the_code_of_the_step_before_is_accepted_but_not_older_ones():
    previous = pyotp.TOTP(SECRET).at(T0 - 30)
    assert presence.totp_step(SECRET, previous, T0 + 1) == T0 // 30 - 1
    older = pyotp.TOTP(SECRET).at(T0 - 60)
    assert presence.totp_step(SECRET, older, T0 + 1) is None


def test_a_future_code_and_garbage_are_refused():
    assert presence.totp_step(SECRET, pyotp.TOTP(SECRET).at(T0 + 30), T0) is None
    for code in ("", "12345", "1234567", "abcdef", "１２３４５６"):
        assert presence.totp_step(SECRET, code, T0) is None


def test_a_code_of_another_secret_is_refused():
    other = pyotp.random_base32(32)
    code = pyotp.TOTP(other).at(T0)
    if code != pyotp.TOTP(SECRET).at(T0) and code != pyotp.TOTP(SECRET).at(T0 - 30):
        assert presence.totp_step(SECRET, code, T0) is None


def test_new_secrets_are_random_160_bit_base32_and_the_uri_carries_them():
    first, second = presence.new_totp_secret(), presence.new_totp_secret()
    assert first != second and len(first) == 32 and pyotp.TOTP(first).now().isdigit()
    uri = presence.provisioning_uri(first, "member-1")
    assert uri.startswith("otpauth://totp/") and f"secret={first}" in uri and "member-1" in uri


# --- PIN ----------------------------------------------------------------------------------------------


def test_a_pin_is_stored_as_salted_scrypt_and_verifies():
    pin_hash, salt, params = presence.hash_pin("4821")
    assert params == "scrypt:n=16384,r=8,p=1" and len(salt) == 16 and len(pin_hash) == 32
    assert pin_hash == hashlib.scrypt(b"4821", salt=salt, n=2**14, r=8, p=1, dklen=32)
    assert b"4821" not in pin_hash + salt
    assert presence.pin_matches("4821", pin_hash, salt, params)
    assert not presence.pin_matches("4822", pin_hash, salt, params)
    assert not presence.pin_matches("", pin_hash, salt, params)


def test_the_same_pin_hashes_differently_per_member():
    assert presence.hash_pin("123456")[0] != presence.hash_pin("123456")[0]


@pytest.mark.parametrize("pin", ["", "123", "1234567890123", "12a4", "12 34", "٠١٢٣"])
def test_pin_rules_are_4_to_12_ascii_digits(pin):
    with pytest.raises(Rejection) as refused:
        presence.hash_pin(pin)
    assert refused.value.code is Code.INVALID_ARGUMENT and "4..12 digits" in refused.value.message


def test_the_lock_message_names_the_time_it_ends():
    assert "until 2027-01-15T08:00:00Z" in presence.lock_message("m-1", 1_800_000_000_000_000)


# --- spending caps ------------------------------------------------------------------------------------


def test_spends_within_the_caps_pass_and_the_one_past_a_cap_is_refused_with_a_retry_time():
    spends = velocity.add((), 600, NOW_US - 30 * MINUTE_US)
    spends = velocity.add(spends, 300, NOW_US - 10 * MINUTE_US)
    assert velocity.refusal(spends, NOW_US, "m", 0, 100, 1_000, 0) is None  # 900 + 100 = 1000
    refused = velocity.refusal(spends, NOW_US, "m", 0, 101, 1_000, 0)
    assert refused.code is Code.RESOURCE_EXHAUSTED and not refused.recorded
    # the 600 spent 30 minutes ago stop counting an hour after the end of their minute
    retry = NOW_US - 30 * MINUTE_US + MINUTE_US + HOUR_US
    assert velocity.retry_at_us(spends, NOW_US, HOUR_US, 1_000, 101) == retry
    assert "retry after 2027-01-15T08:31:00Z" in refused.message
    assert "900 point-units spent in the last hour" in refused.message
    assert "member_points_spent_per_hour_max" in refused.message


def test_the_day_cap_counts_24_hours_and_the_later_retry_wins():
    spends = velocity.add((), 500, NOW_US - 20 * HOUR_US)
    spends = velocity.add(spends, 400, NOW_US - 5 * MINUTE_US)
    assert velocity.spent(spends, NOW_US, velocity.DAY_US) == 900
    assert velocity.spent(spends, NOW_US, HOUR_US) == 400
    refused = velocity.refusal(spends, NOW_US, "m", 0, 200, 500, 1_000)
    assert "24 hours" in refused.message and "last hour" in refused.message
    day_retry = NOW_US - 20 * HOUR_US + MINUTE_US + velocity.DAY_US
    hour_retry = NOW_US - 5 * MINUTE_US + MINUTE_US + HOUR_US
    assert velocity.retry_at_us(spends, NOW_US, velocity.DAY_US, 1_000, 200) == day_retry
    assert velocity.retry_at_us(spends, NOW_US, HOUR_US, 500, 200) == hour_retry
    assert f"retry after {velocity._iso(max(day_retry, hour_retry))}" in refused.message


def test_open_holds_count_as_spent_and_waiting_cannot_free_them():
    assert velocity.refusal((), NOW_US, "m", 800, 200, 1_000, 0) is None
    refused = velocity.refusal((), NOW_US, "m", 900, 200, 1_000, 0)
    assert refused.code is Code.RESOURCE_EXHAUSTED and "capture or void" in refused.message
    assert velocity.retry_at_us((), NOW_US, HOUR_US, 1_000, 1_100) is None


def test_one_spend_above_a_cap_can_never_pass():
    refused = velocity.refusal((), NOW_US, "m", 0, 1_001, 1_000, 0)
    assert refused.code is Code.FAILED_PRECONDITION and "at most 1000" in refused.message


def test_no_caps_refuse_nothing():
    assert velocity.refusal(velocity.add((), 10**12, NOW_US), NOW_US, "m", 10**12, 10**12, 0, 0) is None


def test_a_spend_counts_for_its_window_plus_at_most_a_minute():
    spends = velocity.add((), 100, NOW_US + 59_000_000)  # late in the minute NOW_US starts
    end = NOW_US + MINUTE_US + HOUR_US
    assert velocity.spent(spends, end - 1, HOUR_US) == 100
    assert velocity.spent(spends, end, HOUR_US) == 0


def test_buckets_merge_per_minute_and_older_than_a_day_are_dropped():
    spends = velocity.add((), 100, NOW_US)
    spends = velocity.add(spends, 50, NOW_US + 30_000_000)
    assert spends == ((NOW_US // MINUTE_US, 150),)
    later = NOW_US + velocity.DAY_US + 2 * MINUTE_US
    spends = velocity.add(spends, 7, later)
    assert spends == ((later // MINUTE_US, 7),)
    assert velocity.pruned(((NOW_US // MINUTE_US, 5),), later) == ()


def test_spends_loaded_out_of_order_stay_sorted():
    spends = velocity.add((), 5, NOW_US + 2 * MINUTE_US)
    spends = velocity.add(spends, 3, NOW_US)
    spends = velocity.add(spends, 4, NOW_US + 2 * MINUTE_US)
    assert spends == ((NOW_US // MINUTE_US, 3), (NOW_US // MINUTE_US + 2, 9))


def test_program_state_spends_follow_its_undo_log():
    from processor.program import ProgramState

    state = ProgramState()
    state.begin()
    state.spend("m", 100, NOW_US)
    state.commit()
    state.begin()
    state.spend("m", 50, NOW_US)
    state.spend("n", 7, NOW_US)
    assert velocity.spent(state.spends["m"], NOW_US, HOUR_US) == 150
    state.rollback_newest()
    assert state.spends == {"m": ((NOW_US // MINUTE_US, 100),)}
    assert state.flush().empty  # kept in memory only: nothing for Postgres
    state.prune_spends(NOW_US + velocity.DAY_US + MINUTE_US)
    assert state.spends == {}


KEY = bytes(range(32))


def test_a_sealed_secret_opens_only_with_its_key_and_member():
    sealed = presence.seal_secret(SECRET, "member-1", KEY)
    assert sealed.startswith("aesgcm:") and SECRET not in sealed
    assert sealed != presence.seal_secret(SECRET, "member-1", KEY)  # a fresh nonce each time
    assert presence.open_secret(sealed, "member-1", KEY) == SECRET
    for member, key in (("member-2", KEY), ("member-1", bytes(32))):
        with pytest.raises(Rejection) as refused:
            presence.open_secret(sealed, member, key)
        assert refused.value.code is Code.INTERNAL and "does not open" in refused.value.message
    with pytest.raises(Rejection) as refused:
        presence.open_secret(sealed, "member-1", None)
    assert "POINTS_MEMBER_SECRET_KEY" in refused.value.message


def test_without_a_key_secrets_are_kept_as_they_are():
    assert presence.seal_secret(SECRET, "m", None) == SECRET
    assert presence.open_secret(SECRET, "m", KEY) == SECRET  # enrolled before the key was set


def test_the_secret_key_setting_is_base64_of_32_bytes_and_never_in_the_repr():
    import base64

    from processor import config

    text = base64.b64encode(KEY).decode()
    settings = config.load({}, {"POINTS_MEMBER_SECRET_KEY": text})
    assert config.member_secret_key(settings) == KEY and text not in repr(settings)
    assert config.member_secret_key(config.load({}, {})) is None
    with pytest.raises(ValueError, match="member_secret_key must be base64 of 32 bytes"):
        config.load({}, {"POINTS_MEMBER_SECRET_KEY": base64.b64encode(bytes(16)).decode()})
