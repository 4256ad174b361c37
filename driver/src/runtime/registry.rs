//! Which registry an image reference names, so the plugin's credentials go
//! only to the registry they were configured for.

/// Docker Hub under its canonical name.
const DOCKER_HUB: &str = "docker.io";

/// The registry host (with port) an image reference pulls from: the first
/// path component when it looks like a host (has a `.` or a `:`, or is
/// `localhost`, or has an upper-case letter), else Docker Hub — the rule of Docker's reference parser
/// (`distribution/reference` `splitDockerDomain`).
pub fn registry_of(image: &str) -> String {
    let name = image.split('@').next().unwrap_or(image);
    match name.split_once('/') {
        Some((first, _))
            if first.contains(['.', ':']) || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            normalize(first)
        }
        _ => DOCKER_HUB.to_string(),
    }
}

/// A registry as written in `server_address`: scheme, path and case dropped,
/// Docker Hub's aliases folded into `docker.io`.
pub fn normalize(server: &str) -> String {
    let s = server.trim();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | "docker.io" => DOCKER_HUB.into(),
        _ => host,
    }
}

/// The one spelling of an image reference (`busybox`, `library/busybox:latest`
/// and `docker.io/library/busybox` name one image): registry, path, and the
/// tag (`latest` when none) or digest.
pub fn canonical(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let (name, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    let registry = registry_of(name);
    let path = match name.split_once('/') {
        Some((first, rest)) if normalize(first) == registry && registry != DOCKER_HUB || first == "docker.io" => rest,
        Some((first, rest))
            if registry == DOCKER_HUB && ["index.docker.io", "registry-1.docker.io"].contains(&first) =>
        {
            rest
        }
        _ => name,
    };
    let path = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_string() };
    match digest {
        Some(d) => format!("{registry}/{path}@{d}"),
        None => format!("{registry}/{path}:{}", tag.unwrap_or("latest")),
    }
}

/// Whether credentials for `server_address` may be sent when pulling `image`.
pub fn credentials_apply(server_address: &str, image: &str) -> bool {
    !server_address.trim().is_empty() && normalize(server_address) == registry_of(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_name_their_registry() {
        for (image, registry) in [
            ("busybox", "docker.io"),
            ("vllm/vllm-openai:latest", "docker.io"),
            ("ghcr.io/huggingface/text-generation-inference:2", "ghcr.io"),
            ("localhost/x", "localhost"),
            ("localhost:5000/x:1", "localhost:5000"),
            ("Registry.Example:443/a/b@sha256:00", "registry.example:443"),
            ("127.0.0.1:5000/m", "127.0.0.1:5000"),
            ("Localhost/x", "localhost"),
            ("Corpreg/x", "corpreg"),
        ] {
            assert_eq!(registry_of(image), registry, "{image}");
        }
    }

    #[test]
    fn one_image_has_one_spelling() {
        for same in
            ["busybox", "busybox:latest", "library/busybox", "docker.io/library/busybox:latest", "docker.io/busybox"]
        {
            assert_eq!(canonical(same), "docker.io/library/busybox:latest", "{same}");
        }
        assert_eq!(canonical("vllm/vllm-openai"), "docker.io/vllm/vllm-openai:latest");
        assert_eq!(canonical("localhost:5000/a/b:1"), "localhost:5000/a/b:1");
        assert_eq!(canonical("ghcr.io/o/i@sha256:ab"), "ghcr.io/o/i@sha256:ab");
        assert_ne!(canonical("busybox:1"), canonical("busybox:2"));
    }

    #[test]
    fn credentials_go_only_to_their_registry() {
        assert!(credentials_apply("https://index.docker.io/v1/", "vllm/vllm-openai"));
        assert!(credentials_apply("docker.io", "library/busybox"));
        assert!(credentials_apply("ghcr.io", "ghcr.io/o/i:1"));
        assert!(credentials_apply("https://registry.example:5000", "registry.example:5000/i"));
        assert!(!credentials_apply("ghcr.io", "vllm/vllm-openai"));
        assert!(!credentials_apply("registry.example:5000", "registry.example/i"), "another port is another registry");
        assert!(!credentials_apply("registry.example", "evil.example/registry.example/i"));
        assert!(!credentials_apply("", "busybox"));
        assert!(!credentials_apply("docker.io", "Corpreg/x"), "an upper-case first part is a host to Docker");
    }
}
