"""Credentials never leave the process: URIs are shown and stored without them.

A tracking URI may carry a user and password (``http://user:pw@host:5000``). The driver
takes them out once, into MLflow's own ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` for this process, and uses the bare URI everywhere else:
tags, run names, plans, stdout. :func:`mask` hides what else could carry a secret in a
text that is about to be printed or stored (the command line, an error message).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://userinfo@ : the userinfo (user, user:password, or a token as the user) is a secret.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# ?token=... &password=... : query parameters that carry secrets.
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:[A-Za-z0-9]+[-_])*(?:password|passwd|pwd|token|secret|key|sig|signature)=)"
                           r"[^&;\s'\"]+", re.IGNORECASE)


def mask(text: str) -> str:
    """``text`` with every URI's userinfo and secret-looking query values replaced by ***."""
    def userinfo(m: re.Match) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user + ':' if colon else ''}{MASK}@"

    return _SECRET_QUERY.sub(lambda m: m["key"] + MASK, _USERINFO.sub(userinfo, text))


def take_from_uri(uri: str) -> str:
    """The URI without its user and password; those go to MLflow's environment variables of
    this process (MLflow's REST client sends them as HTTP basic auth), never further."""
    if "://" not in uri or "@" not in uri.split("://", 1)[1].split("/", 1)[0]:
        return uri
    from orchestrator.errors import ConfigError

    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("tracking.uri", mask(uri), "allowed: scheme://[user:password@]host[:port][/path]",
                          problem="not a valid URI") from None
    if parts.username is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = parts.username
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = parts.password
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
