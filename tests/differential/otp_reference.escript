#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noshell
%%
%% Differential-test reference: runs a batch of supervision-tree cases
%% through Erlang/OTP's real `supervisor` module and prints event lines.
%%
%% Usage: escript otp_reference.escript CASES_FILE
%%
%% CASES_FILE holds one Erlang term per case (read with file:consult/1):
%%
%%   {'case', Index, Seed, RootSup, Faults}.
%%
%%   RootSup = {sup, "root", Strategy, Intensity, Period, AutoShutdown, Children}
%%   Child   = {worker, Id, Restart, Significant}
%%           | {sup, Id, Restart, Significant, Strategy, Intensity, Period,
%%              AutoShutdown, Children}
%%   Faults  = [{kill | normal, Path}]
%%
%% Output (stdout), for each case in file order:
%%
%%   case Index
%%   <event lines>           (see below)
%%
%% followed, once the whole batch is through, by a single line `done`.
%% If a case fails inside this script, the events logged so far are printed
%% followed by `case_error Index Reason` (instead of `end`/`root_exit`), and
%% the batch goes on with the next case.
%%
%% Event lines: `sup_start PATH`, `start PATH`, `stop PATH`,
%% `fault kill|normal PATH`, `skip kill|normal PATH`, and finally either
%% `root_exit` (the root supervisor terminated on its own) or `end`
%% (after which the tree is torn down silently).
-module(otp_reference).
-mode(compile).
%% Callback module for gen_server (logger, workers) and supervisor; no
%% -behaviour attributes because both behaviours require init/1.

-export([main/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(LOG, otp_reference_event_log).
%% Upper bound on how long any single wait may take before the case is
%% declared broken (it never comes close in practice).
-define(WAIT_MS, 30000).
%% Max number of snapshot rounds while waiting for quiescence.
-define(MAX_ROUNDS, 20000).

%% ---------------------------------------------------------------------
%% Entry point
%% ---------------------------------------------------------------------

main([File]) ->
    %% OTP's own supervisor/crash reports would go to stdout: silence them.
    ok = logger:set_primary_config(level, none),
    process_flag(trap_exit, true),
    {ok, Cases} = file:consult(File),
    {ok, _} = gen_server:start({local, ?LOG}, ?MODULE, event_log, []),
    lists:foreach(fun run_case_and_print/1, Cases),
    io:put_chars("done\n"),
    halt(0);
main(_) ->
    io:put_chars(standard_error, "usage: otp_reference.escript CASES_FILE\n"),
    halt(2).

run_case_and_print({'case', Index, _Seed, _Root, _Faults} = Case) ->
    io:put_chars(["case ", integer_to_list(Index), "\n"]),
    Lines = try
                run_case(Case)
            catch
                Class:Reason:Stack ->
                    Events = collect(),
                    Msg = io_lib:format("~w:~w ~w", [Class, Reason, Stack]),
                    Flat = lists:flatten(Msg),
                    Events ++ ["case_error " ++ integer_to_list(Index) ++ " "
                               ++ [C || C <- Flat, C =/= $\n]]
            end,
    io:put_chars([[L, "\n"] || L <- Lines]).

%% ---------------------------------------------------------------------
%% One case
%% ---------------------------------------------------------------------

run_case({'case', _Index, _Seed,
          {sup, "root", Strategy, Intensity, Period, AutoShutdown, Children},
          Faults}) ->
    flush_exits(),
    ok = gen_server:call(?LOG, reset),
    Spec = {sup_spec, "root", Strategy, Intensity, Period, AutoShutdown, Children},
    {ok, Root} = supervisor:start_link(?MODULE, Spec),
    RootRef = erlang:monitor(process, Root),
    case quiesce(Root, RootRef) of
        alive -> ok;
        dead -> error(root_died_during_start)
    end,
    case apply_faults(Faults, Root, RootRef) of
        dead ->
            log("root_exit"),
            Events = collect(),
            flush_exits(),
            Events;
        alive ->
            log("end"),
            Events = collect(),
            ok = gen_server:call(?LOG, mute),
            teardown(Root, RootRef),
            Events
    end.

apply_faults([], _Root, _RootRef) ->
    alive;
apply_faults([{Kind, Path} | Rest], Root, RootRef) ->
    apply_fault(Kind, Path, Root),
    case quiesce(Root, RootRef) of
        alive -> apply_faults(Rest, Root, RootRef);
        dead -> dead
    end.

apply_fault(Kind, Path, Root) ->
    [_RootId | Ids] = string:split(Path, "/", all),
    KindStr = atom_to_list(Kind),
    case find_worker(Root, Ids) of
        {ok, Pid} ->
            log("fault " ++ KindStr ++ " " ++ Path),
            Ref = erlang:monitor(process, Pid),
            case Kind of
                kill -> exit(Pid, kill);
                normal -> gen_server:cast(Pid, stop)
            end,
            receive
                {'DOWN', Ref, process, Pid, _} -> ok
            after ?WAIT_MS ->
                error({worker_did_not_exit, Path})
            end;
        none ->
            log("skip " ++ KindStr ++ " " ++ Path)
    end.

%% Walk the live tree from the root following child ids.
find_worker(Sup, [Id]) ->
    case child_pid(Sup, Id) of
        {ok, Pid, worker} -> {ok, Pid};
        _ -> none
    end;
find_worker(Sup, [Id | Rest]) ->
    case child_pid(Sup, Id) of
        {ok, Pid, supervisor} -> find_worker(Pid, Rest);
        _ -> none
    end.

child_pid(Sup, Id) ->
    case which_children(Sup) of
        {ok, Children} ->
            case lists:keyfind(Id, 1, Children) of
                {Id, Pid, Type, _} when is_pid(Pid) -> {ok, Pid, Type};
                _ -> none
            end;
        error ->
            none
    end.

which_children(Sup) ->
    try supervisor:which_children(Sup) of
        L when is_list(L) -> {ok, L}
    catch
        exit:_ -> error
    end.

%% ---------------------------------------------------------------------
%% Quiescence: the tree is quiet when two consecutive snapshots (each of
%% which is a synchronous call to every live supervisor) are identical,
%% every pid in them is alive, no child is `restarting`, no supervisor is
%% unreachable, and no supervisor has anything left in its mailbox.
%% ---------------------------------------------------------------------

quiesce(Root, RootRef) ->
    quiesce(Root, RootRef, 0).

quiesce(_Root, _RootRef, N) when N >= ?MAX_ROUNDS ->
    error(tree_never_quiesced);
quiesce(Root, RootRef, N) ->
    receive
        {'DOWN', RootRef, process, Root, _} -> dead
    after 0 ->
        case snapshot(Root) of
            unreachable ->
                wait_root_down(Root, RootRef);
            {ok, S1} ->
                Quiet1 = quiet(S1),
                case snapshot(Root) of
                    {ok, S2} when Quiet1, S1 =:= S2 ->
                        case quiet(S2) of
                            true -> alive;
                            false -> retry(Root, RootRef, N)
                        end;
                    unreachable ->
                        wait_root_down(Root, RootRef);
                    {ok, _} ->
                        retry(Root, RootRef, N)
                end
        end
    end.

retry(Root, RootRef, N) ->
    timer:sleep(1),
    quiesce(Root, RootRef, N + 1).

wait_root_down(Root, RootRef) ->
    receive
        {'DOWN', RootRef, process, Root, _} -> dead
    after ?WAIT_MS ->
        error(root_unreachable_but_alive)
    end.

%% Snapshot = {SupPid, [{Id, Pid | restarting | undefined, Sub}]} where
%% Sub is a nested snapshot for supervisor children with a pid, else none.
snapshot(Sup) ->
    case which_children(Sup) of
        {ok, Children} ->
            {ok, {Sup, [child_snapshot(C) || C <- Children]}};
        error ->
            unreachable
    end.

child_snapshot({Id, Pid, supervisor, _}) when is_pid(Pid) ->
    {Id, Pid, snapshot(Pid)};
child_snapshot({Id, Pid, _Type, _}) ->
    {Id, Pid, none}.

quiet({Sup, Children}) ->
    mailbox_empty(Sup) andalso lists:all(fun quiet_child/1, Children).

quiet_child({_Id, restarting, _}) -> false;
quiet_child({_Id, undefined, _}) -> true;
quiet_child({_Id, Pid, none}) -> is_process_alive(Pid);
quiet_child({_Id, _Pid, unreachable}) -> false;
quiet_child({_Id, Pid, {ok, Sub}}) -> is_process_alive(Pid) andalso quiet(Sub).

mailbox_empty(Pid) ->
    case erlang:process_info(Pid, message_queue_len) of
        {message_queue_len, 0} -> true;
        _ -> false
    end.

%% ---------------------------------------------------------------------
%% Teardown and housekeeping
%% ---------------------------------------------------------------------

teardown(Root, RootRef) ->
    exit(Root, shutdown),
    receive
        {'DOWN', RootRef, process, Root, _} -> ok
    after ?WAIT_MS ->
        exit(Root, kill),
        receive {'DOWN', RootRef, process, Root, _} -> ok end,
        error(teardown_timeout)
    end,
    flush_exits().

flush_exits() ->
    receive
        {'EXIT', _, _} -> flush_exits()
    after 0 ->
        ok
    end.

log(Line) ->
    ok = gen_server:call(?LOG, {log, Line}, ?WAIT_MS).

collect() ->
    gen_server:call(?LOG, collect, ?WAIT_MS).

%% ---------------------------------------------------------------------
%% Callbacks. One module plays three roles, told apart by init/1's arg:
%%   event_log            - the single logger (gen_server)
%%   {sup_spec, ...}      - a supervisor (supervisor callback)
%%   {worker, Path}       - a worker (gen_server)
%% ---------------------------------------------------------------------

init(event_log) ->
    {ok, {event_log, false, []}};
init({sup_spec, Path, Strategy, Intensity, Period, AutoShutdown, Children}) ->
    log("sup_start " ++ Path),
    Flags = #{strategy => Strategy,
              intensity => Intensity,
              period => Period,
              auto_shutdown => AutoShutdown},
    {ok, {Flags, [child_spec(Path, C) || C <- Children]}};
init({worker, Path}) ->
    process_flag(trap_exit, true),
    log("start " ++ Path),
    {ok, {worker, Path}}.

child_spec(Parent, {worker, Id, Restart, Significant}) ->
    Path = Parent ++ "/" ++ Id,
    #{id => Id,
      start => {gen_server, start_link, [?MODULE, {worker, Path}, []]},
      restart => Restart,
      significant => Significant,
      shutdown => 2000,
      type => worker,
      modules => [?MODULE]};
child_spec(Parent, {sup, Id, Restart, Significant, Strategy, Intensity, Period,
                    AutoShutdown, Children}) ->
    Path = Parent ++ "/" ++ Id,
    Spec = {sup_spec, Path, Strategy, Intensity, Period, AutoShutdown, Children},
    #{id => Id,
      start => {supervisor, start_link, [?MODULE, Spec]},
      restart => Restart,
      significant => Significant,
      shutdown => infinity,
      type => supervisor,
      modules => [?MODULE]}.

handle_call({log, Line}, _From, {event_log, Muted, Acc}) ->
    Acc1 = case Muted of
               true -> Acc;
               false -> [Line | Acc]
           end,
    {reply, ok, {event_log, Muted, Acc1}};
handle_call(collect, _From, {event_log, Muted, Acc}) ->
    {reply, lists:reverse(Acc), {event_log, Muted, []}};
handle_call(reset, _From, {event_log, _, _}) ->
    {reply, ok, {event_log, false, []}};
handle_call(mute, _From, {event_log, _, Acc}) ->
    {reply, ok, {event_log, true, Acc}}.

handle_cast(stop, {worker, _} = State) ->
    {stop, normal, State};
handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info(_Msg, State) ->
    {noreply, State}.

terminate(shutdown, {worker, Path}) ->
    log("stop " ++ Path);
terminate(_Reason, _State) ->
    ok.
