//! A private CA and a server certificate for 127.0.0.1 and localhost, for a
//! registry on HTTPS (`http.tls.certificate`/`key`).

use std::path::{Path, PathBuf};

pub struct Pki {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl Pki {
    /// Write `ca.pem`, `server.pem` and `server.key` into `dir`.
    pub fn generate(dir: &Path) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hydrafy test private CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let pki = Pki {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("server.pem"),
            key_pem: dir.join("server.key"),
        };
        std::fs::write(&pki.ca_pem, ca_cert.pem()).unwrap();
        std::fs::write(&pki.cert_pem, cert.pem()).unwrap();
        std::fs::write(&pki.key_pem, key.serialize_pem()).unwrap();
        pki
    }

    /// The registry config lines that serve HTTPS with this certificate.
    pub fn registry_config(&self) -> String {
        format!(
            "http.tls:\nhttp.  certificate: {}\nhttp.  key: {}\n",
            self.cert_pem.display(),
            self.key_pem.display()
        )
    }
}
