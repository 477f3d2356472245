//! KVM's trace events in the nested host: the only record of where a guest vCPU really
//! was when it triple-faulted, since KVM on AMD resets the vCPU before the VMM hears of
//! the shutdown (docs/vmm.md). Jobs made here are references (they run no VMM).

use crate::job::Job;

/// SVM exit code of a shutdown (a triple fault): the `exit_reason` KVM's `kvm_exit`
/// event carries on AMD.
pub const SVM_EXIT_SHUTDOWN: u32 = 0x7f;

/// What to trace besides the shutdown exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// Only shutdown exits.
    Nothing,
    /// Also the exceptions KVM injected and the MSR accesses it refused.
    ExceptionsAndMsrs,
}

/// A job that turns the trace on; it fails when the nested host has no KVM trace events.
pub fn enable(name: &str, extra: Extra) -> Job {
    let mut script = format!(
        "T=/sys/kernel/tracing\n\
         mount -t tracefs nodev $T 2>/dev/null\n\
         [ -e $T/events/kvm ] || {{ echo \"no KVM trace events in $T\"; exit 1; }}\n\
         echo 8192 > $T/buffer_size_kb\n\
         echo 'exit_reason == {SVM_EXIT_SHUTDOWN}' > $T/events/kvm/kvm_exit/filter || exit 1\n\
         echo 1 > $T/events/kvm/kvm_exit/enable || exit 1\n"
    );
    if extra == Extra::ExceptionsAndMsrs {
        script.push_str(
            "echo 1 > $T/events/kvm/kvm_inj_exception/enable\n\
             echo 'failed == 1' > $T/events/kvm/kvm_msr/filter\n\
             echo 1 > $T/events/kvm/kvm_msr/enable\n",
        );
    }
    script.push_str("echo \"KVM tracing on\"\n");
    Job::shell(name, script).reference()
}

/// A job that prints the trace recorded so far (its last 400 events), clears it, and
/// ends with the line `trace end`.
pub fn take(name: &str) -> Job {
    Job::shell(
        name,
        "T=/sys/kernel/tracing\n\
         grep -v '^#' $T/trace | tail -n 400\n\
         echo > $T/trace\n\
         echo 'trace end'\n",
    )
    .reference()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_filter_on_the_shutdown_exit_and_are_references() {
        let on = enable("on", Extra::Nothing);
        assert!(!on.under_test());
        let script = on.argv.last().cloned().unwrap_or_default();
        assert!(script.contains("'exit_reason == 127'"), "{script}");
        assert!(!script.contains("kvm_msr"), "{script}");
        let more = enable("on", Extra::ExceptionsAndMsrs);
        assert!(more
            .argv
            .last()
            .is_some_and(|s| s.contains("kvm_inj_exception")));
        let take = take("t");
        assert!(!take.under_test());
        assert!(take
            .argv
            .last()
            .is_some_and(|s| s.ends_with("echo 'trace end'\n")));
    }
}
