"""Signs inbound webhook requests the way each platform does, with a library from PyPI
rather than the gateway's code, for tests/slack_*.rs and tests/whatsapp_*.rs.

  sign.py slack SECRET      Slack's X-Slack-Signature, by slack_sdk's own
                            SignatureVerifier.generate_signature (v0:TIMESTAMP:BODY).
  sign.py whatsapp SECRET   Meta's X-Hub-Signature-256 (GitHub's scheme: sha256= hex
                            HMAC-SHA256 of the body with the app secret), each one checked
                            by pywa's webhook_updates_validator, a third-party WhatsApp
                            library's validator, before it is handed out.

Reads one JSON object a line, {"body": "...", "timestamp": "..."} (timestamp: Slack only),
and writes one a line, {"signature": "..."}, flushed, until stdin closes.
"""

import hashlib
import hmac
import json
import sys

platform, secret = sys.argv[1], sys.argv[2]

if platform == "slack":
    from slack_sdk.signature import SignatureVerifier

    verifier = SignatureVerifier(signing_secret=secret)

    def sign(req):
        return verifier.generate_signature(timestamp=req["timestamp"], body=req["body"])

elif platform == "whatsapp":
    from pywa.utils import webhook_updates_validator

    def sign(req):
        body = req["body"].encode("utf-8")
        sig = "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
        if not webhook_updates_validator(app_secret=secret, request_body=body, x_hub_signature=sig):
            raise SystemExit("pywa refuses the signature")
        return sig

else:
    raise SystemExit(f"unknown platform {platform}")

for line in sys.stdin:
    if not line.strip():
        continue
    print(json.dumps({"signature": sign(json.loads(line))}), flush=True)
