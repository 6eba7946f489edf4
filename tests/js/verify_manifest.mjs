// Verify a Sameseed format-2 manifest without any Sameseed code: RFC 8785 bytes from `canonicalize`
// (by an author of RFC 8785), Ed25519 from node:crypto.
// Usage: node verify_manifest.mjs MANIFEST.json KEYS.json   (KEYS.json: a saved GET /v1/keys answer)
// Prints "valid" and exits 0, or prints why not and exits 1.
import { readFileSync } from "node:fs";
import { createPublicKey, verify } from "node:crypto";
import canonicalize from "canonicalize";

const [manifestPath, keysPath] = process.argv.slice(2);
const { signature, ...unsigned } = JSON.parse(readFileSync(manifestPath, "utf8"));
const key = JSON.parse(readFileSync(keysPath, "utf8")).keys.find((k) => k.key_id === signature.key_id);
if (key === undefined) {
  console.log(`no public key with id ${signature.key_id}`);
  process.exit(1);
}
const signed = Buffer.from(canonicalize(unsigned), "utf8");
const ok = verify(null, signed, createPublicKey(key.public_key_pem), Buffer.from(signature.value, "base64"));
console.log(ok ? "valid" : "invalid: the signature does not match the manifest");
process.exit(ok ? 0 : 1);
