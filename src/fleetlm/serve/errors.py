"""OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}, with the status each deserves."""

from __future__ import annotations

from fleetlm.errors import FleetError


class APIError(FleetError):
    """An error the gateway answers to the client; subclasses fix the HTTP status and OpenAI's error type."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RequestTimeout(APIError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(APIError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class BudgetExceeded(APIError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class ServiceUnavailable(APIError):
    status, type, code = 503, "service_unavailable", "no_backend_available"


class BackendError(APIError):
    """A backend failed (timeout, refused connection, 5xx). `retryable` says whether another try may help."""

    status, type, code = 502, "upstream_error", "backend_failed"

    def __init__(self, message: str, *, retryable: bool = True, upstream_status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.upstream_status = upstream_status


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
