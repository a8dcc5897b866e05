//! The admin's dashboard: `GET /` (and `/dashboard`) on the admin listener answers one
//! self-contained page, `dashboard.html`, embedded in the binary. Its script reads the same JSON
//! a script would (`/stats`, `/stats/history`, `/summary`, `/health`, by relative URLs) every few
//! seconds and draws the charts itself, so the page shows nothing a script cannot get and loads
//! nothing from anywhere else: no CDN, no web font.
//!
//! The page's Content-Security-Policy allows exactly its own inline `<style>` and `<script>`, by
//! their SHA-256 hashes computed here from the embedded file, so the policy cannot drift from the
//! page, and requests only to the node itself.

use std::sync::LazyLock;

use base64::Engine as _;
use http::{header, HeaderValue, Response};
use sha2::{Digest, Sha256};

use crate::serve::ResponseBody;

/// The page: HTML, CSS and script in one file.
pub(crate) const PAGE: &str = include_str!("dashboard.html");

/// The page's Content-Security-Policy, built once from the page's own style and script.
static CONTENT_SECURITY_POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
    let style = inline_hash(PAGE, "style");
    let script = inline_hash(PAGE, "script");
    let policy = format!(
        "default-src 'none'; connect-src 'self'; img-src 'self' data:; \
         style-src '{style}'; script-src '{script}'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy).expect("a policy of hashes is a valid header value")
});

/// The CSP source expression (`sha256-<base64>`) of the content of the page's one `<tag>`
/// element, which is what a browser hashes to check an inline style or script.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = page
        .find(&open)
        .unwrap_or_else(|| panic!("dashboard.html has a <{tag}>"))
        + open.len();
    let end = start
        + page[start..]
            .find(&close)
            .unwrap_or_else(|| panic!("dashboard.html closes its <{tag}>"));
    let digest = Sha256::digest(&page.as_bytes()[start..end]);
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The answer to `GET /`: the page, never cached (it is small, and a stale copy after an upgrade
/// would read endpoints the node no longer has), under its strict policy.
pub(crate) fn page_response() -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(PAGE));
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY.clone(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_hashes_of_the_pages_style_and_script() {
        let policy = CONTENT_SECURITY_POLICY.to_str().unwrap();
        assert_eq!(PAGE.matches("<script>").count(), 1, "one inline script");
        assert_eq!(PAGE.matches("<style>").count(), 1, "one inline style");
        assert!(!PAGE.contains("<script "), "no script with attributes");
        assert!(policy.contains(&format!("script-src '{}'", inline_hash(PAGE, "script"))));
        assert!(policy.contains(&format!("style-src '{}'", inline_hash(PAGE, "style"))));
        assert!(!policy.contains("unsafe"), "{policy}");
        // The hash of a known text, as `openssl dgst -sha256 -binary | base64` gives it.
        assert_eq!(
            inline_hash("<script>alert(1)</script>", "script"),
            "sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI="
        );
    }
}
