//! A one-line progress display on stderr for the waits (set-up, drain, verification).
//!
//! On a terminal the line is rewritten in place with `\r`; into a file or a CI log it prints a
//! line at most every few seconds, so logs stay short.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a non-terminal gets a new line.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A progress line; [`Progress::finish`] ends it.
#[derive(Debug)]
pub struct Progress {
    label: String,
    started: Instant,
    terminal: bool,
    last_logged: Mutex<Option<Instant>>,
}

impl Progress {
    pub fn new(label: &str) -> Self {
        Progress {
            label: label.to_owned(),
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            last_logged: Mutex::new(None),
        }
    }

    /// Shows `message` with the time spent so far.
    pub fn update(&self, message: &str) {
        let line = format!(
            "{} [{}s] {message}",
            self.label,
            self.started.elapsed().as_secs()
        );
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r{line}\x1b[K");
            let _ = stderr.flush();
        } else {
            let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                *last = Some(Instant::now());
                let _ = writeln!(stderr, "{line}");
            }
        }
    }

    /// Ends the line with a final message.
    pub fn finish(&self, message: &str) {
        let line = format!(
            "{} [{}s] {message}",
            self.label,
            self.started.elapsed().as_secs()
        );
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = writeln!(stderr, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(stderr, "{line}");
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
