//! The `Auto` chain against injected environments (no network, no process environment), and
//! the Azure CLI source with a fake `az`.

use std::ffi::{OsStr, OsString};
use std::sync::Mutex;

use super::*;
use crate::credentials::azure::plan::auto_choice;

/// A directory holding an executable-looking `az`, and an empty one.
struct Paths {
    _dir: tempfile::TempDir,
    with_az: String,
    without_az: String,
}

fn paths() -> Paths {
    let dir = tempfile::tempdir().unwrap();
    let with_az = dir.path().join("bin");
    let without_az = dir.path().join("empty");
    std::fs::create_dir(&with_az).unwrap();
    std::fs::create_dir(&without_az).unwrap();
    std::fs::write(
        with_az.join(if cfg!(windows) { "az.cmd" } else { "az" }),
        "",
    )
    .unwrap();
    Paths {
        with_az: with_az.to_str().unwrap().to_owned(),
        without_az: without_az.to_str().unwrap().to_owned(),
        _dir: dir,
    }
}

/// (name, variables, object id configured, Azure VM, expected, reason expected in a skip)
type Case<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    bool,
    bool,
    EntraKind,
    &'a str,
);

#[test]
fn auto_chain_table() {
    use EntraKind::*;
    let p = paths();
    let (az, no_az) = (p.with_az.as_str(), p.without_az.as_str());
    let sp = [("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_ID", "c")];
    let cases: &[Case] = &[
        (
            "secret",
            [&sp[..], &[("AZURE_CLIENT_SECRET", "s"), ("PATH", az)]].concat(),
            false,
            false,
            ServicePrincipal,
            "",
        ),
        (
            "certificate beats workload identity",
            [
                &sp[..],
                &[
                    ("AZURE_CLIENT_CERTIFICATE_PATH", "/c.pem"),
                    ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
                ],
            ]
            .concat(),
            false,
            true,
            ServicePrincipal,
            "",
        ),
        (
            "workload identity",
            [
                &sp[..],
                &[("AZURE_FEDERATED_TOKEN_FILE", "/t"), ("PATH", az)],
            ]
            .concat(),
            false,
            false,
            WorkloadIdentity,
            "AZURE_CLIENT_SECRET",
        ),
        (
            "empty secret counts as unset",
            [
                &sp[..],
                &[
                    ("AZURE_CLIENT_SECRET", ""),
                    ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
                ],
            ]
            .concat(),
            false,
            false,
            WorkloadIdentity,
            "AZURE_CLIENT_SECRET",
        ),
        (
            "app service",
            vec![
                ("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi"),
                ("PATH", az),
            ],
            false,
            false,
            ManagedIdentity,
            "AZURE_FEDERATED_TOKEN_FILE not set",
        ),
        (
            "azure vm",
            vec![("PATH", az)],
            false,
            true,
            ManagedIdentity,
            "AZURE_FEDERATED_TOKEN_FILE",
        ),
        (
            "object id",
            vec![("PATH", az)],
            true,
            false,
            ManagedIdentity,
            "",
        ),
        (
            "no az anywhere",
            vec![("PATH", no_az)],
            false,
            false,
            ManagedIdentity,
            "",
        ),
        ("no PATH", vec![], false, false, ManagedIdentity, ""),
        (
            "developer",
            vec![("PATH", az)],
            false,
            false,
            AzureCli,
            "IDENTITY_ENDPOINT not set",
        ),
        (
            "client id alone is not a service principal",
            [&sp[..], &[("PATH", az)]].concat(),
            false,
            false,
            AzureCli,
            "AZURE_CLIENT_CERTIFICATE_PATH",
        ),
    ];
    for (name, vars, object_id, azure_vm, want, skip_reason) in cases {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = Environment::from_fn(
            move |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()),
            *azure_vm,
        );
        let config = EntraConfig {
            object_id: object_id.then(|| "oid".to_owned()),
            ..Default::default()
        };
        let choice = auto_choice(&config, &env);
        assert_eq!(choice.kind, *want, "{name}: {choice:?}");
        let reasons: Vec<&str> = choice.skipped.iter().map(|(_, r)| r.as_str()).collect();
        assert!(
            reasons.iter().any(|r| r.contains(skip_reason)) || skip_reason.is_empty(),
            "{name}: {choice:?}"
        );
    }
}

#[test]
fn auto_builds_the_chosen_source() {
    let p = paths();
    let cases = [
        (vec![("PATH", p.with_az.as_str())], "azure-cli"),
        (vec![("PATH", p.without_az.as_str())], "managed-identity"),
        (
            vec![
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
                ("AZURE_CLIENT_SECRET", "s"),
            ],
            "service-principal",
        ),
    ];
    for (vars, name) in cases {
        // Built only, never fetched: no transport is needed and none is used.
        let source = source_in(EntraConfig::default(), &env(&vars)).unwrap();
        assert_eq!(source.name(), name);
    }
    // A service principal chosen by its secret but lacking a tenant is an error naming it.
    let err = source_in(
        EntraConfig::default(),
        &env(&[("AZURE_CLIENT_SECRET", "s"), ("AZURE_CLIENT_ID", "c")]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("AZURE_TENANT_ID"), "{err}");
}

/// Stands in for `az`: records the command line and answers with canned output.
#[derive(Debug)]
struct FakeAz {
    code: i32,
    stdout: String,
    stderr: String,
    ran: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl azure_identity::Executor for FakeAz {
    async fn run(&self, program: &OsStr, args: &[&OsStr]) -> std::io::Result<std::process::Output> {
        let mut line = OsString::from(program);
        for arg in args {
            line.push(" ");
            line.push(arg);
        }
        self.ran
            .lock()
            .unwrap()
            .push(line.to_string_lossy().into_owned());
        #[cfg(unix)]
        let status = std::os::unix::process::ExitStatusExt::from_raw(self.code << 8);
        #[cfg(windows)]
        let status = std::os::windows::process::ExitStatusExt::from_raw(self.code as u32);
        Ok(std::process::Output {
            status,
            stdout: self.stdout.clone().into_bytes(),
            stderr: self.stderr.clone().into_bytes(),
        })
    }
}

#[tokio::test]
async fn azure_cli_runs_az_with_the_scope() {
    bounded(async {
        let token = jwt("cli");
        let expires_on = unix_now() + 3000;
        let answer = serde_json::json!({
            "accessToken": token, "expires_on": expires_on, "tokenType": "Bearer",
        });
        let config = EntraConfig {
            kind: EntraKind::AzureCli,
            tenant_id: Some("tenant-1".into()),
            ..Default::default()
        };
        let mut source = EntraSource::new(config, &env(&[])).unwrap();
        let fake = Arc::new(FakeAz {
            code: 0,
            stdout: answer.to_string(),
            stderr: String::new(),
            ran: Mutex::default(),
        });
        source.executor = fake.clone();
        assert_eq!(source.name(), "azure-cli");
        let got = source.fetch().await.unwrap();
        assert_eq!(got.token.expose(), token);
        assert_eq!(
            got.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(expires_on))
        );
        let ran = fake.ran.lock().unwrap().join("\n");
        assert!(
            ran.contains(
                "az account get-access-token -o json --scope \
                 https://redis.azure.com/.default --tenant tenant-1"
            ),
            "{ran}"
        );

        let fake = Arc::new(FakeAz {
            code: 1,
            stdout: String::new(),
            stderr: "ERROR: Please run 'az login' to setup account.".into(),
            ran: Mutex::default(),
        });
        source.executor = fake;
        let err = source.fetch().await.unwrap_err().to_string();
        assert!(err.contains("az login"), "{err}");
    })
    .await
}
