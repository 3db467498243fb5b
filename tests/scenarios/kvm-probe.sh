# The test host's KVM (nested SVM under TCG) runs guest code natively as far as rvirt-kvm-probe
# can tell, and this machine's probe answer is what scripts/demo relies on.
. /lib/rvirt/scenario.sh
line=$(rvirt-kvm-probe)
rc=$?
echo "$line"
if [ "$rc" = 0 ]; then pass probe.native "$line"; else fail probe.native "status $rc: $line"; fi
