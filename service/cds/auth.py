"""The one place the CDS Hooks endpoints get their client authentication from: the CDS Hooks client JWT
dependency of ``service.security`` (ES384/RS384, issuer allow-list, exact aud, exp/iat, jti replay; bare 401).
"""

from __future__ import annotations

from service.security import CdsClient, cds_client

__all__ = ["CdsClient", "cds_client"]
