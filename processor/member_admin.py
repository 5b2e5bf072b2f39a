"""MemberAdminService (admin.proto): the operator enrolls a member's means of proving presence at a till
(processor/presence.py). Operator keys only (rpc.ACCEPTED_KINDS). A TOTP secret leaves the service once,
in EnrollMemberTotp's response; a PIN is stored only as its scrypt hash. Neither is logged."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc
from processor import presence
from processor.config import Settings
from processor.domain import Code, Rejection
from processor.pipeline import Pipeline, now_micros
from processor.presence import Presence
from processor.presence_store import Credentials
from processor.servicer import Validator, guard, timestamp
from processor.store import micros


def _timestamp(moment: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if moment is None else timestamp(micros(moment))


def verification_message(member_id: str, credentials: Credentials | None, now_us: int) -> pb.MemberVerification:
    if credentials is None:
        return pb.MemberVerification(member_id=member_id)
    locked = credentials.locked_until_us() > now_us
    return pb.MemberVerification(
        member_id=member_id,
        totp_enrolled=credentials.totp_secret is not None,
        totp_enrolled_at=_timestamp(credentials.totp_enrolled_at),
        pin_set=credentials.pin_hash is not None,
        pin_set_at=_timestamp(credentials.pin_set_at),
        failures=credentials.failures,
        locked_until=_timestamp(credentials.locked_until) if locked else None,
    )


class MemberAdminServicer(admin_pb2_grpc.MemberAdminServiceServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline, member_presence: Presence):
        self.settings = settings
        self.pipeline = pipeline
        self.presence = member_presence
        self.validate = Validator(settings)

    async def EnrollMemberTotp(self, request: pb.EnrollMemberTotpRequest, context) -> pb.EnrollMemberTotpResponse:
        async def call():
            member_id = self.validate.identifier(request.member_id, "member_id")
            secret, now_us = presence.new_totp_secret(), now_micros()
            stored = presence.seal_secret(secret, member_id, self.presence.secret_key)
            if not await self.presence.store.enroll_totp(member_id, stored, request.replace, now_us):
                raise Rejection(
                    Code.FAILED_PRECONDITION,
                    f"member {member_id!r} has a one-time code app enrolled already; send replace=true "
                    "to enroll a new secret (the old one stops working at once)",
                )
            return pb.EnrollMemberTotpResponse(
                member_id=member_id,
                secret_base32=secret,
                provisioning_uri=presence.provisioning_uri(secret, member_id),
                digits=presence.TOTP_DIGITS,
                period_seconds=presence.TOTP_PERIOD_SECONDS,
                enrolled_at=timestamp(now_us),
            )

        return await guard(context, call)

    async def SetMemberPin(self, request: pb.SetMemberPinRequest, context) -> pb.SetMemberPinResponse:
        async def call():
            member_id = self.validate.identifier(request.member_id, "member_id")
            pin_hash, salt, params = await self.presence.hash_pin(request.pin)
            now_us = now_micros()
            credentials = await self.presence.store.set_pin(member_id, pin_hash, salt, params, now_us)
            return pb.SetMemberPinResponse(verification=verification_message(member_id, credentials, now_us))

        return await guard(context, call)

    async def ResetMemberVerification(
        self, request: pb.ResetMemberVerificationRequest, context
    ) -> pb.ResetMemberVerificationResponse:
        async def call():
            member_id = self.validate.identifier(request.member_id, "member_id")
            credentials = await self.presence.store.reset(member_id, request.remove_totp, request.remove_pin)
            if credentials is None:
                raise Rejection(Code.NOT_FOUND, f"member {member_id!r} has nothing enrolled and no failures")
            return pb.ResetMemberVerificationResponse(
                verification=verification_message(member_id, credentials, now_micros())
            )

        return await guard(context, call)

    async def GetMemberVerification(
        self, request: pb.GetMemberVerificationRequest, context
    ) -> pb.GetMemberVerificationResponse:
        async def call():
            member_id = self.validate.identifier(request.member_id, "member_id")
            credentials = await self.presence.store.credentials(member_id)
            if credentials is None:
                raise Rejection(
                    Code.NOT_FOUND,
                    f"member {member_id!r} has nothing enrolled and no failures; "
                    "enroll with EnrollMemberTotp or SetMemberPin",
                )
            return pb.GetMemberVerificationResponse(
                verification=verification_message(member_id, credentials, now_micros())
            )

        return await guard(context, call)
