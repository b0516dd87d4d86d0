//! Test support: a fresh database per test on the real servers.
//!
//! The servers are named by `RP_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `RP_TEST_MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306/mysql`). Every database is called `rp_t_<random>` so tests
//! run in parallel and the test script can drop leftovers of earlier runs by prefix. A server
//! that does not answer fails the test: nothing is skipped silently.

use sea_orm::{ConnectionTrait, Database};

/// Which database server a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

/// A database created for one test.
#[derive(Debug)]
pub struct TestDatabase {
    pub backend: Backend,
    pub url: String,
    name: String,
    admin_url: Option<String>,
}

fn admin_url(backend: Backend) -> String {
    match backend {
        Backend::Postgres => std::env::var("RP_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        Backend::MySql => std::env::var("RP_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_owned()),
        Backend::Sqlite => String::new(),
    }
}

/// Replaces the database part of a server URL.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| i + scheme_end);
    let mut out = format!("{}/{}", &base[..host_end], database);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

impl TestDatabase {
    /// Creates an empty database on the backend's server.
    pub async fn create(backend: Backend) -> Self {
        let name = format!("rp_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        if backend == Backend::Sqlite {
            let dir = std::env::temp_dir().join("redpacket-tests");
            std::fs::create_dir_all(&dir).expect("create the temporary directory");
            let path = dir.join(format!("{name}.sqlite"));
            return TestDatabase {
                backend,
                url: format!("sqlite://{}?mode=rwc", path.display()),
                name,
                admin_url: None,
            };
        }
        let admin = admin_url(backend);
        let connection = Database::connect(&admin).await.unwrap_or_else(|err| {
            panic!("the {backend:?} test server at {admin} must be running: {err}")
        });
        connection
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|err| panic!("creating test database {name}: {err}"));
        connection.close().await.ok();
        TestDatabase {
            backend,
            url: with_database(&admin, &name),
            name,
            admin_url: Some(admin),
        }
    }

    /// Drops the database (SQLite: deletes the file). Leftovers of failed tests are dropped by
    /// the test script by their `rp_t_` prefix.
    pub async fn drop_database(self) {
        match self.admin_url {
            Some(admin) => {
                if let Ok(connection) = Database::connect(&admin).await {
                    let sql = match self.backend {
                        Backend::Postgres => {
                            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
                        }
                        _ => format!("DROP DATABASE IF EXISTS {}", self.name),
                    };
                    connection.execute_unprepared(&sql).await.ok();
                    connection.close().await.ok();
                }
            }
            None => {
                let path = std::env::temp_dir()
                    .join("redpacket-tests")
                    .join(format!("{}.sqlite", self.name));
                for suffix in ["", "-wal", "-shm"] {
                    std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_part_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("mysql://root@h:3306", "x"),
            "mysql://root@h:3306/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
