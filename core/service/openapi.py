"""The OpenAPI 3.0 document of the custody service's HTTP API (served at /openapi.json).

Written by hand next to the routes in `strongroom.server`; schemathesis checks the running
service against it (tests/test_server.py). docs/server.md describes the same API in prose.
"""

from __future__ import annotations

from typing import Any

API_VERSION = "1"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._@:+/-]{0,127}$"
"""Key names, as `Keystore` accepts them."""


def openapi_document(
    backends: list[str] | None = None, key_types: list[str] | None = None
) -> dict[str, Any]:
    """The API as OpenAPI 3.0 (served at /openapi.json; docs/server.md)."""
    b64 = {"type": "string", "format": "byte"}
    keyname = {"type": "string", "pattern": NAME_PATTERN}
    ident = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
    sign_alg = {"type": "string", "enum": ["pkcs1v15", "pss", None], "nullable": True}
    enc_alg = {
        "type": "string",
        "enum": ["oaep-sha256", "oaep-sha1", "aes-kwp", None],
        "nullable": True,
    }
    usage = {
        "type": "array",
        "nullable": True,
        "items": {
            "type": "string",
            "enum": ["sign", "verify", "encrypt", "decrypt", "wrap", "unwrap", "derive", "agree"],
        },
    }
    keytype: dict[str, Any] = {"type": "string"}
    if key_types:
        keytype["enum"] = list(key_types)
    backend: dict[str, Any] = {"type": "string", "nullable": True}
    if backends:
        backend["enum"] = [*backends, None]  # OpenAPI 3.0: a nullable enum lists null
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {"type": "string"},
                    "message": {"type": "string"},
                    "retries_left": {"type": "integer"},
                },
            }
        },
    }
    key = {
        "type": "object",
        "required": ["name", "namespace", "type", "backend", "usage", "version"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "type": {"type": "string"},
            "backend": {"type": "string"},
            "usage": {"type": "array", "items": {"type": "string"}},
            "exportable": {"type": "boolean"},
            "version": {"type": "integer"},
            "created": {"type": "string", "nullable": True},
            "min_decryption_version": {"type": "integer", "nullable": True},
            "disabled": {"type": "boolean"},
            "delete_after": {"type": "string", "nullable": True},
        },
    }
    anyobj = {"type": "object", "additionalProperties": True}
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }
    tenant_param = {
        "name": "tenant",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 64},
    }

    def op(
        summary: str,
        response: dict[str, Any],
        *,
        body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None,
        status: str = "200",
        auth: bool = True,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "summary": summary,
            "responses": {
                status: {
                    "description": "success",
                    "content": {"application/json": {"schema": response}},
                },
                "default": {
                    "description": "an error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
        if body is not None:
            out["requestBody"] = {
                "required": bool(body.get("required")),
                "content": {"application/json": {"schema": body}},
            }
        if params:
            out["parameters"] = params
        if not auth:
            out["security"] = []
        return out

    def obj(required: list[str], **props: Any) -> dict[str, Any]:
        return {"type": "object", "required": required, "properties": props}

    keyref = {"$ref": "#/components/schemas/Key"}
    adopt_type = {**keytype, "nullable": True}  # adopt reads the type from the backend
    if "enum" in adopt_type:
        adopt_type["enum"] = [*adopt_type["enum"], None]
    data_op = obj(
        ["data"],
        data=b64,
        algorithm=sign_alg,
        envelope={"type": "boolean"},
        prehashed={"type": "boolean"},
    )
    paths: dict[str, Any] = {
        "/v1/health": {
            "get": op("liveness", obj(["status"], status={"type": "string"}), auth=False)
        },
        "/openapi.json": {"get": op("this document", anyobj, auth=False)},
        "/v1/whoami": {"get": op("the caller's identity", anyobj)},
        "/v1/backends": {"get": op("configured backends", anyobj)},
        "/v1/keys": {
            "get": op("the caller's keys", obj(["keys"], keys={"type": "array", "items": keyref})),
            "post": op(
                "generate a key",
                keyref,
                status="201",
                body=obj(
                    ["name", "type"],
                    name=keyname,
                    type=keytype,
                    backend=backend,
                    usage=usage,
                    exportable={"type": "boolean"},
                    material=b64,
                    format={"type": "string", "enum": ["auto", "raw", "der", "pem"]},
                ),
            ),
        },
        "/v1/keys/{name}": {
            "get": op("show a key", keyref, params=[name_param]),
            "delete": op(
                "delete a key: after deletion_wait (or `after` seconds), or at once with now=true",
                obj(
                    [],
                    deleted={"type": "string"},
                    scheduled={"type": "string"},
                    delete_after={"type": "string"},
                ),
                params=[
                    name_param,
                    {
                        "name": "now",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 315360000},
                    },
                ],
            ),
        },
        "/v1/keys/{name}/mac": {
            "post": op(
                "HMAC-SHA256 with an HMAC key",
                obj(["mac"], mac=b64),
                body=obj(["data"], data=b64),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/derive": {
            "post": op(
                "HKDF-SHA256 from a key into a new key",
                keyref,
                status="201",
                body=obj(
                    ["new_name"],
                    new_name=keyname,
                    type=keytype,
                    usage=usage,
                    salt=b64,
                    info=b64,
                    exportable={"type": "boolean"},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/rotate": {
            "post": op(
                "a new primary version",
                keyref,
                body={"type": "object", "properties": {"backend": backend}},
                params=[name_param],
            )
        },
        "/v1/keys/{name}/versions": {
            "get": op(
                "the key's versions",
                obj(["versions"], versions={"type": "array", "items": anyobj}),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/disable": {"post": op("disable a key", keyref, params=[name_param])},
        "/v1/keys/{name}/enable": {"post": op("enable a key", keyref, params=[name_param])},
        "/v1/keys/{name}/config": {
            "post": op(
                "set min_decryption_version",
                keyref,
                body=obj(
                    ["min_decryption_version"],
                    min_decryption_version={"type": "integer", "minimum": 1},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/cancel-deletion": {
            "post": op("cancel a scheduled deletion", keyref, params=[name_param])
        },
        "/v1/keys/{name}/public": {
            "get": op(
                "the public key",
                obj([], pem={"type": "string"}, der=b64),
                params=[
                    name_param,
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["pem", "der"]},
                    },
                    {
                        "name": "version",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 2147483648},
                    },
                ],
            )
        },
        "/v1/keys/{name}/sign": {
            "post": op("sign", obj(["signature"], signature=b64), body=data_op, params=[name_param])
        },
        "/v1/keys/{name}/verify": {
            "post": op(
                "verify a signature",
                obj(["valid"], valid={"type": "boolean"}),
                body=obj(
                    ["data", "signature"],
                    data=b64,
                    signature=b64,
                    algorithm=sign_alg,
                    envelope={"type": "boolean"},
                    prehashed={"type": "boolean"},
                    version={"type": "integer", "minimum": 1, "nullable": True},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/encrypt": {
            "post": op(
                "encrypt",
                obj(["ciphertext"], ciphertext=b64),
                body=obj(
                    ["plaintext"],
                    plaintext=b64,
                    aad=b64,
                    algorithm=enc_alg,
                    envelope={"type": "boolean"},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/decrypt": {
            "post": op(
                "decrypt",
                obj(["plaintext"], plaintext=b64),
                body=obj(
                    ["ciphertext"],
                    ciphertext=b64,
                    aad=b64,
                    algorithm=enc_alg,
                    envelope={"type": "boolean"},
                    version={"type": "integer", "minimum": 1, "nullable": True},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/agree": {
            "post": op(
                "ECDH/X25519 into a new key",
                keyref,
                status="201",
                body=obj(
                    ["new_name", "peer"],
                    new_name=keyname,
                    peer={"type": "string"},
                    type=keytype,
                    salt=b64,
                    info=b64,
                    usage=usage,
                    exportable={"type": "boolean"},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/export": {
            "post": op(
                "export an exportable key: pem (text), der or raw (base64)",
                obj([], pem={"type": "string"}, der=b64, raw=b64),
                body=obj([], format={"type": "string", "enum": ["pem", "der", "raw"]}),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/wrap": {
            "post": op(
                "wrap the exportable key `key` under this key (AES key wrap, RFC 5649)",
                obj(["blob"], blob=b64),
                body=obj(["key"], key=keyname),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/unwrap": {
            "post": op(
                "unwrap a wrapped key into a new key",
                keyref,
                status="201",
                body=obj(
                    ["blob", "new_name", "type"],
                    blob=b64,
                    new_name=keyname,
                    type=keytype,
                    usage=usage,
                    exportable={"type": "boolean"},
                ),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/rewrap": {
            "post": op(
                "re-encrypt an enveloped ciphertext under the primary version",
                obj(["ciphertext"], ciphertext=b64),
                body=obj(["ciphertext"], ciphertext=b64, aad=b64, algorithm=enc_alg),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/attest": {
            "post": op(
                "a statement from the key's backend that the key lives in its hardware",
                obj(["statement"], statement=anyobj),
                body=obj([], nonce={**b64, "nullable": True}),
                params=[name_param],
            )
        },
        "/v1/keys/{name}/adopt": {
            "post": op(
                "register a key that already exists in a backend, found by `ref`",
                keyref,
                status="201",
                body=obj(
                    ["backend", "ref"],
                    backend={"type": "string"},
                    ref={
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": {"type": "string"},
                    },
                    type=adopt_type,
                    usage=usage,
                ),
                params=[name_param],
            )
        },
        "/v1/random": {
            "post": op(
                "random bytes",
                obj(["data"], data=b64),
                body=obj(
                    ["n"],
                    n={"type": "integer", "minimum": 1, "maximum": 65536},
                    backend=backend,
                ),
            )
        },
        "/v1/vault": {"get": op("vault status (admin)", anyobj)},
        "/v1/vault/lock": {"post": op("lock the vault (admin)", anyobj)},
        "/v1/vault/unlock": {
            "post": op(
                "unlock the vault (admin)",
                anyobj,
                body=obj([], method={"type": "string", "nullable": True}),
            )
        },
        "/v1/audit/records": {
            "get": op(
                "audit records (admin)",
                obj(["records"], records={"type": "array", "items": anyobj}),
                params=[
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                    {
                        "name": "last",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                ],
            )
        },
        "/v1/audit/verify": {"get": op("verify the audit log (admin)", anyobj)},
        "/v1/audit/checkpoint": {"post": op("sign a checkpoint now (admin)", anyobj)},
        "/v1/tenants": {
            "get": op(
                "tenants (admin)", obj(["tenants"], tenants={"type": "array", "items": anyobj})
            ),
            "post": op(
                "create a tenant (admin)",
                obj(["name"], name={"type": "string"}),
                status="201",
                body=obj(["name"], name=ident),
            ),
        },
        "/v1/tenants/{tenant}/tokens": {
            "post": op(
                "issue an API token (admin); shown once",
                obj(
                    ["token"],
                    tenant={"type": "string"},
                    name={"type": "string"},
                    token={"type": "string"},
                ),
                status="201",
                body=obj(["name"], name=ident),
                params=[tenant_param],
            )
        },
        "/v1/tenants/{tenant}/identities/{name}": {
            "delete": op(
                "revoke an identity (admin)",
                obj(["revoked"], revoked={"type": "string"}),
                params=[tenant_param, name_param],
            )
        },
        "/v1/policies": {
            "get": op(
                "policies (admin)",
                obj(["policies"], policies={"type": "array", "items": anyobj}),
                params=[
                    {
                        "name": "tenant",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
            ),
            "post": op("grant permissions (admin)", anyobj, body=_policy_schema(True)),
            "delete": op("take permissions back (admin)", anyobj, body=_policy_schema(False)),
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Strongroom key custody service",
            "version": API_VERSION,
            "description": "One key API over hardware key stores; see docs/server.md.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": error, "Key": key},
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
    }


def _policy_schema(perms_required: bool) -> dict[str, Any]:
    required = ["tenant", "identity", "keys"] + (["permissions"] if perms_required else [])
    return {
        "type": "object",
        "required": required,
        "properties": {
            "tenant": {"type": "string"},
            "identity": {"type": "string"},
            "keys": {"type": "string"},
            "permissions": {"type": "array", "items": {"type": "string"}},
        },
    }


__all__ = ["API_VERSION", "openapi_document"]
