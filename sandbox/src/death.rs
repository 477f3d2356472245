//! Why a nested host died, from its console: the kernel's own panic, oops and lockup
//! lines, told apart from what jobs printed (a nested guest's panic is a job's output).

/// Lines of a dead nested host's console that tell why it died.
pub fn death_lines(console: &str) -> String {
    const MARKS: [&str; 12] = [
        "Kernel panic",
        "Fatal exception",
        "BUG:",
        "Oops",
        "RIP:",
        "corrupted stack",
        "stack guard",
        "soft lockup",
        "rcu_sched",
        "hung_task",
        "general protection",
        "Call Trace",
    ];
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| !is_job_output(l))
        .filter(|l| MARKS.iter().any(|m| l.contains(m)))
        .collect();
    if lines.is_empty() {
        "the console says nothing about it (no panic, oops or lockup message)".to_string()
    } else {
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Whether a console line is a job's output (`[<job name>] ...`, where a nested guest's
/// own panic would be) rather than the nested host's kernel (`[  12.345678] ...`).
pub fn is_job_output(line: &str) -> bool {
    let Some(inner) = line.strip_prefix('[').and_then(|l| l.split(']').next()) else {
        return false;
    };
    let timestamp = inner.trim_start();
    let kernel = !timestamp.is_empty()
        && timestamp.contains('.')
        && timestamp.chars().all(|c| c.is_ascii_digit() || c == '.');
    !kernel && !inner.is_empty() && !inner.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_host_is_explained_by_its_panic_lines() {
        let console = "[ 1.0] ordinary\n\
                       [ 99.1] BUG: stack guard page was hit at 000000003c5b2d0d\n\
                       [ 99.2] RIP: 0010:exc_page_fault+0x1/0x1e0\n\
                       [ 99.3] Kernel panic - not syncing: Fatal exception in interrupt\n";
        let guest = "[quantix-4cpu-1] [ 5.0] Kernel panic - not syncing: in the guest\n";
        assert!(is_job_output(guest));
        assert!(!is_job_output("[   99.1] BUG: x"));
        assert!(!is_job_output("[12345.678901] BUG: x"));
        assert!(death_lines(guest).contains("says nothing"));
        let d = death_lines(console);
        assert!(d.contains("stack guard"), "{d}");
        assert!(d.contains("Kernel panic"), "{d}");
        assert!(!d.contains("ordinary"), "{d}");
        assert!(death_lines("[ 1.0] quiet\n").contains("says nothing"));
    }
}
